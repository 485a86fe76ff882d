"""What the end-to-end serving tests share: tiny random model folders of each conditional kind (written here, no
network), the small calibration they quantize with, and reading a PNG the service returned.

The fixture that serves such a folder (`serve`) is in conftest.py; this module is imported by name because tests/ is
on sys.path (as test_openvino's constants are).
"""

from __future__ import annotations

import io
import json
import string
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from quantizer.diffusion.kinds import class_names_index
from quantizer.evaluation.train import DEFAULT_SCHEDULER_CONFIG

# Small enough to calibrate a tiny UNet in about a second (as tests/test_service_quantized.py does).
CALIBRATION = {"n_samples": 8, "steps": 4, "batch_size": 8, "n_candidates": 10, "act_samples": 4096}

CLASSES = 4
CC_UNET_CONFIG = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4, "attention_head_dim": 8, "num_class_embeds": CLASSES,
}
CONTEXT, WIDTH = 16, 16  # the text-to-image model's tokens per prompt and embedding size


def save_class_conditional(path: Path, class_names: Sequence[str] | None = None, seed: int = 1) -> Path:
    """A random 8x8 class-conditional UNet2DModel (CLASSES labels) in the diffusers layout; with class_names, the
    model_index.json that names them (as the built-in class-conditional model's does)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    UNet2DModel(**CC_UNET_CONFIG).save_pretrained(path / "unet")
    DDPMScheduler(**DEFAULT_SCHEDULER_CONFIG).save_config(path / "scheduler")
    if class_names is not None:
        (path / "model_index.json").write_text(json.dumps(class_names_index(class_names)))
    return path


def tiny_tokenizer(folder: Path) -> object:
    """A CLIP BPE tokenizer over single characters (no merges): every lowercase word tokenizes, offline."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.!'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CONTEXT)


def save_text_to_image(path: Path, seed: int = 4) -> Path:
    """A random Stable-Diffusion-layout pipeline (StableDiffusionPipeline.save_pretrained writes it): 1-layer CLIP
    text encoder, 4x4x4 latent UNet2DConditionModel, AutoencoderKL upsampling 2x, so 8x8 RGB images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-vocab")
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=CONTEXT,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=WIDTH, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=8)
    scheduler = DDIMScheduler(**{**DEFAULT_SCHEDULER_CONFIG, "steps_offset": 1, "clip_sample": False})
    StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def decode_png(png: bytes) -> np.ndarray:
    """The pixels of a PNG the service returned (and that it is one)."""
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image)


def generate_png(client: object, body: dict) -> tuple[httpx.Response, np.ndarray]:
    """POST /v1/generate asking for the PNG itself: the response (its headers say more) and the decoded image."""
    response = client.post("/v1/generate", json=body, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return response, decode_png(response.content)
