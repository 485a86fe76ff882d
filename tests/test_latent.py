"""Unconditional latent diffusion (diffusers' LDMPipeline layout) end to end: kind and decoded size from the configs,
sampling in latent space decoded by a VQModel or an AutoencoderKL, PTQ4DM on the latent UNet, the int8 OpenVINO
graph, and the service (API, queue, worker) serving PNGs of the decoded size.

Tiny random models stand in for trained ones: a 4x4x3 latent UNet with a VQModel that upsamples 4x (16x16 RGB), and
a 4x4x4 latent UNet with an AutoencoderKL that upsamples 2x (8x8 RGB).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
from markers import needs_openvino
from serving_helpers import CALIBRATION, decode_png, generate_png
from test_openvino import OPENVINO_VS_FAKE_BOUND
from test_quantize import rel_error

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.kinds import LATENT, ModelKind, image_size, read_kind
from quantizer.diffusion.latents import decode_latents
from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.engine import Engine
from quantizer.evaluation.train import DEFAULT_SCHEDULER_CONFIG
from quantizer.execution.executor import build_executor
from quantizer.ptq.cache import hash_state_dict
from quantizer.ptq.calibration import build_calibration_set
from quantizer.ptq.config import CalibrationConfig
from quantizer.ptq.pipeline import quantize_model
from service.model_info import model_info

pytest_plugins = ["service.testing"]


def latent_unet(channels: int) -> UNet2DModel:
    return UNet2DModel(sample_size=4, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LDMPipeline.save_pretrained itself writes the layout: unet/, vqvae/, scheduler/, model_index.json."""
    torch.manual_seed(2)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), latent_channels=3,
                    num_vq_embeddings=16, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("ldm-vq")
    LDMPipeline(vqvae=vqvae, unet=latent_unet(3), scheduler=DDIMScheduler(**DEFAULT_SCHEDULER_CONFIG)).save_pretrained(
        path)
    return path


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same layout with a KL autoencoder under vae/ (Stable Diffusion's name for it)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("ldm-kl")
    latent_unet(4).save_pretrained(path / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, sample_size=8, scaling_factor=0.5).save_pretrained(path / "vae")
    DDIMScheduler(**DEFAULT_SCHEDULER_CONFIG).save_config(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    return path


@pytest.fixture(scope="module")
def vq_model(vq_dir):  # noqa: ANN201
    return load_model(vq_dir)


def test_kind_and_decoded_size_come_from_the_configs(vq_dir, kl_dir, vq_model):
    for path, size in ((vq_dir, (16, 16)), (kl_dir, (8, 8))):
        assert read_kind(path) == ModelKind(LATENT)  # torch-free, what the API reads
        assert image_size(path) == size and model_info(str(path)).size == f"{size[1]}x{size[0]}"
    assert vq_model.kind == LATENT and isinstance(vq_model.decoder, VQModel)
    assert vq_model.sample_shape == (3, 4, 4) and vq_model.image_shape == (3, 16, 16)
    kl = load_model(kl_dir)
    assert isinstance(kl.decoder, AutoencoderKL) and kl.image_shape == (3, 8, 8) and kl.kind == LATENT


@pytest.mark.parametrize(("index", "message"), [
    ({"vqvae": ["diffusers", "Mystery"]}, "latent decoder vqvae=Mystery"),
    ({"vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DModel"]}, "class-conditional latent"),
])
def test_unsupported_latent_models_say_what_they_are(tmp_path, index, message):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "num_class_embeds": 3}))
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for read in (read_kind, load_model):
        with pytest.raises(ValueError, match=message):
            read(tmp_path)


def test_sampling_matches_diffusers_ldm_pipeline(vq_dir, vq_model):
    """The same x_T (a seed's generator), DDIM, then the VQ decode: pixel for pixel what LDMPipeline makes."""
    pipe = LDMPipeline.from_pretrained(vq_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=4, eta=0.0,
               output_type="np").images
    ours = sample(vq_model.unet, vq_model.scheduler_config, [5], steps=4, decoder=vq_model.decoder)
    assert ours.shape == (1, 3, 16, 16)
    np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


def test_the_kl_decoder_divides_by_its_scaling_factor(kl_dir):
    model = load_model(kl_dir)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decode_latents(model.decoder, z), model.decoder.decode(z / 0.5).sample)
    images = sample(model.unet, model.scheduler_config, [1, 2], steps=3, decoder=model.decoder)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_image_k_depends_only_on_its_seed(vq_model):
    unet, sched, vae = vq_model.unet, vq_model.scheduler_config, vq_model.decoder
    alone = sample(unet, sched, [5], steps=4, eta=0.5, decoder=vae)
    batch = sample(unet, sched, [7, 5, 9], steps=4, eta=0.5, decoder=vae)
    torch.testing.assert_close(batch[1], alone[0], atol=1e-4, rtol=0)
    assert (batch[0] - alone[0]).abs().mean() > 0.01
    # without the decoder, the UNet's own samples: latents (what calibration records)
    assert sample(unet, sched, [5], steps=4, eta=0.5).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="class_labels: the model is unconditional"):  # the UNet alone
        sample(unet, sched, [1], steps=1, class_labels=[0], decoder=vae)


def test_the_engine_generates_decoded_images(vq_dir, vq_model):
    engine = Engine.load(vq_dir)
    assert engine.model_kind == ModelKind(LATENT) and engine.decoder is not None
    assert engine.digest != hash_state_dict(engine.model.unet)  # the decoder's weights are part of the version
    with pytest.raises(ValueError, match="class_labels: the model is an unconditional latent model"):
        engine.validate("ddim", 2, 0.0, 1, [0])
    out = engine.generate([5, 6], steps=2)
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == np.uint8 and out.class_labels is None
    expected = to_uint8(sample(vq_model.unet, vq_model.scheduler_config, [6], steps=2, decoder=vq_model.decoder))
    assert np.abs(out.images[1].astype(int) - expected[0].astype(int)).max() <= 1


@needs_openvino
def test_w8a8_on_openvino_matches_the_simulation(vq_model, tmp_path):
    """Only the UNet is quantized, calibrated on latent trajectories; the decoder stays the fp32 one."""
    q = quantize_model(vq_model, "w8a8", {**CALIBRATION, "preset": "ptq4dm"}, cache_dir=tmp_path, progress=False)
    assert q.decoder is vq_model.decoder and q.kind == LATENT
    probe = build_calibration_set(vq_model.unet, vq_model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=8, steps=4, seed=3), progress=False)
    assert probe.xs.shape == (8, 3, 4, 4)  # latents
    executor = build_executor(q.unet, "openvino", max_batch=8)
    x, t = probe.xs, probe.ts
    with torch.no_grad():
        real = torch.cat([executor(x[i:i + 1], t[i]).sample for i in range(len(x))])
        fake = torch.cat([q.unet(x[i:i + 1], t[i]).sample for i in range(len(x))])
        fp = vq_model.unet(x, t).sample
    assert rel_error(real, fake) < OPENVINO_VS_FAKE_BOUND
    assert rel_error(real, fake) < rel_error(fake, fp) / 2  # the quantized model, not the float one
    # whole generations on the graph, decoded, image by image as in a batch
    images = sample(executor, q.scheduler_config, [3, 4, 5], steps=3, decoder=q.decoder)
    assert images.shape == (3, 3, 16, 16)
    torch.testing.assert_close(images[1:2], sample(executor, q.scheduler_config, [4], steps=3, decoder=q.decoder),
                               atol=1e-4, rtol=0)


def test_api_knows_the_kind_and_size_without_a_worker(vq_dir, serve):
    with serve({"ldm": vq_dir}, worker=False) as client:
        (described,) = client.get("/v1/models").json()
        assert (described["kind"], described["num_classes"], described["width"], described["height"]) == (
            "latent", None, 16, 16)
        r = client.post("/v1/jobs", json={"class_labels": 0})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "class_labels"], r.text
        assert "latent" in r.json()["detail"][0]["msg"]
        wrong = client.post("/v1/images/generations", json={"prompt": "", "size": "4x4"})
        assert wrong.status_code == 422 and "16x16" in wrong.text, wrong.text
        assert client.post("/v1/jobs", json={"n": 2}).status_code == 202


@needs_openvino
def test_served_end_to_end_with_a_real_worker(vq_dir, vq_model, serve):
    with serve({"ldm": vq_dir}) as client:
        _, image = generate_png(client, {"seed": 6})
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8  # the decoded size, not the latent one
        expected = to_uint8(sample(vq_model.unet, vq_model.scheduler_config, [6], steps=3, decoder=vq_model.decoder))
        assert np.abs(image.astype(int) - expected[0].astype(int)).max() <= 1
        q = client.post("/v1/generate", json={"seed": 6, "n": 2, "precision": "w8a8"}).json()
        assert q["status"] == "succeeded", q
        assert [decode_png(base64.b64decode(p)).shape for p in q["images_png_base64"]] == [(16, 16, 3)] * 2
