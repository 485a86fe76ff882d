"""Load a diffusers UNet2DModel and its scheduler config from a local directory or a hub id.

The model's kind (unconditional or class-conditional, `quantizer.diffusion.kinds`) is read from its config before
anything is built, so an unsupported UNet (text-to-image, latent) fails with what it is, not with a diffusers error
about a missing argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from quantizer.constants import BUILTIN_MODEL_NAME
from quantizer.diffusion.kinds import (  # noqa: F401 - re-exported: the library's names for them
    BUILTIN_MODEL_DIR,
    MODELS_DIR,
    ModelKind,
    check_pipeline,
    kind_of,
    resolve_model_path,
)
from quantizer.diffusion.sampling import sample_shape


@dataclass
class DiffusionModel:
    """A UNet plus the scheduler config it was trained with; schedulers are built per call from it."""

    name: str
    unet: UNet2DModel
    scheduler_config: dict
    path: Path | None = None  # the local directory it was loaded from (None: a hub id or built in memory)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return sample_shape(self.unet)

    @property
    def model_kind(self) -> ModelKind:
        """Read from the UNet's config, so a quantized or executed UNet (which carries the same config) agrees."""
        return kind_of(self.unet.config)

    @property
    def kind(self) -> str:
        """'unconditional' or 'class-conditional'."""
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
        check_pipeline(local)
        sub = "unet" if (local / "unet" / "config.json").exists() else None
        sched_sub = "scheduler" if (local / "scheduler" / "scheduler_config.json").exists() else None
        if sub is None and not (local / "config.json").exists():
            raise ValueError(f"model: {source} has neither unet/config.json nor config.json")
    else:
        sub, sched_sub = "unet", "scheduler"
    kind_of(UNet2DModel.load_config(source, subfolder=sub))  # ValueError for a UNet that is not supported yet
    # low_cpu_mem_usage (diffusers' default) needs accelerate and otherwise warns on every start; for UNets of
    # this size the plain load is as fast, so ask for it instead of adding a dependency.
    unet = UNet2DModel.from_pretrained(source, subfolder=sub, low_cpu_mem_usage=False, variant=variant)
    try:
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder=sched_sub))
    except OSError:
        scheduler_config = dict(DDPMScheduler.load_config(source))
    unet.eval().requires_grad_(False).to(device)
    name = BUILTIN_MODEL_NAME if source == str(BUILTIN_MODEL_DIR) else str(name_or_path)
    return DiffusionModel(name=name, unet=unet, scheduler_config=scheduler_config,
                          path=local.resolve() if local.exists() else None)
