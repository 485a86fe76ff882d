"""Load a diffusers UNet2DModel, its scheduler config and (latent models) its decoder from a local directory or a
hub id.

The model's kind (unconditional, class-conditional or latent, `quantizer.diffusion.kinds`) is read from its configs
before anything is built, so an unsupported UNet (text-to-image) fails with what it is, not with a diffusers error
about a missing argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from torch import nn

from quantizer.constants import BUILTIN_MODEL_NAME  # noqa: F401 - re-exported
from quantizer.diffusion.kinds import (  # noqa: F401 - re-exported: the library's names for them
    BUILTIN_MODEL_DIR,
    MODELS_DIR,
    ModelKind,
    check_pipeline,
    kind_of,
    latent_decoder,
    pipeline_kind,
    resolve_model_path,
)
from quantizer.diffusion.latents import decoder_class, upsampling
from quantizer.diffusion.sampling import sample_shape
from quantizer.diffusion.text import PromptEncoder


@dataclass
class DiffusionModel:
    """A UNet plus the scheduler config it was trained with; schedulers are built per call from it.

    decoder: a latent model's VAE (VQModel or AutoencoderKL), which turns the UNet's samples into pixels; None for
    a pixel-space model. It is never quantized.
    text_encoder: a text-to-image model's CLIP tokenizer and text encoder (fp32, never quantized); None otherwise.
    """

    name: str
    unet: UNet2DModel
    scheduler_config: dict
    path: Path | None = None  # the local directory it was loaded from (None: a hub id or built in memory)
    decoder: nn.Module | None = None
    text_encoder: PromptEncoder | None = None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """C x H x W of what the UNet samples (latents for a latent model)."""
        return sample_shape(self.unet)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C x H x W of the images it makes (the decoded size for a latent model)."""
        if self.decoder is None:
            return self.sample_shape
        _, h, w = self.sample_shape
        factor = upsampling(self.decoder)
        return int(self.decoder.config.out_channels), h * factor, w * factor

    @property
    def model_kind(self) -> ModelKind:
        """Read from the UNet's config (a quantized or executed UNet carries the same one), latent with a decoder."""
        decoder = None if self.decoder is None else ("decoder", type(self.decoder).__name__)
        return pipeline_kind(self.unet.config, decoder)

    @property
    def kind(self) -> str:
        """'unconditional', 'class-conditional', 'latent' or 'text-to-image'."""
        return self.model_kind.kind

    @property
    def num_classes(self) -> int | None:
        """Class labels 0..num_classes-1 of a class-conditional model; None for an unconditional one."""
        return self.model_kind.num_classes


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu",
               variant: str | None = None) -> DiffusionModel:
    """Accept the diffusers pipeline layout (unet/, scheduler/) or a bare UNet folder with scheduler_config.json.

    Hub ids work when the network does; the built-in model never needs it. variant: diffusers' weight-file variant
    (e.g. 'fp16' reads diffusion_pytorch_model.fp16.safetensors).
    """
    source = resolve_model_path(name_or_path)
    local = Path(source)
    if local.exists():
        decoder = check_pipeline(local)
        sub = "unet" if (local / "unet" / "config.json").exists() else None
        sched_sub = "scheduler" if (local / "scheduler" / "scheduler_config.json").exists() else None
        if sub is None and not (local / "config.json").exists():
            raise ValueError(f"model: {source} has neither unet/config.json nor config.json")
    else:
        sub, sched_sub = "unet", "scheduler"
        decoder = latent_decoder(_hub_index(source))
    # ValueError for a UNet (or a latent one) that is not supported yet
    kind = pipeline_kind(UNet2DModel.load_config(source, subfolder=sub), decoder)
    unet_class = UNet2DConditionModel if kind.takes_prompt else UNet2DModel
    # low_cpu_mem_usage (diffusers' default) needs accelerate and otherwise warns on every start; for UNets of
    # this size the plain load is as fast, so ask for it instead of adding a dependency.
    unet = unet_class.from_pretrained(source, subfolder=sub, low_cpu_mem_usage=False, variant=variant)
    try:
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder=sched_sub))
    except OSError:
        scheduler_config = dict(DDPMScheduler.load_config(source))
    unet.eval().requires_grad_(False).to(device)
    vae = None
    if decoder is not None:
        component, class_name = decoder
        vae = decoder_class(class_name).from_pretrained(source, subfolder=component, low_cpu_mem_usage=False,
                                                        variant=variant)
        vae.eval().requires_grad_(False).to(device)
    text_encoder = PromptEncoder.from_pretrained(source, variant=variant).to(device) if kind.takes_prompt else None
    name = Path(source).name if Path(source).parent == MODELS_DIR else str(name_or_path)
    return DiffusionModel(name=name, unet=unet, scheduler_config=scheduler_config,
                          path=local.resolve() if local.exists() else None, decoder=vae, text_encoder=text_encoder)


def _hub_index(source: str) -> dict | None:
    """A hub pipeline's model_index.json (which says whether it is latent); None for a bare UNet repository."""
    try:
        return dict(DiffusionPipeline.load_config(source))
    except (OSError, ValueError):
        return None
