"""Load a diffusers UNet2DModel and its scheduler config from a local directory or a hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from quantizer.constants import BUILTIN_MODEL_NAME
from quantizer.diffusion.sampling import sample_shape

# The checkout's models/ by default; an installed wheel has no checkout, so images set PTQ4DM_MODELS_DIR.
MODELS_DIR = Path(os.environ.get("PTQ4DM_MODELS_DIR") or Path(__file__).resolve().parents[2] / "models")
BUILTIN_MODEL_DIR = MODELS_DIR / BUILTIN_MODEL_NAME


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


def resolve_model_path(name_or_path: str | Path | None) -> str:
    """The built-in name (or None) maps to the committed directory; anything else is passed through."""
    if name_or_path is None or str(name_or_path) == BUILTIN_MODEL_NAME:
        if not BUILTIN_MODEL_DIR.is_dir():  # otherwise diffusers would take the path for a hub id
            raise ValueError(f"model: built-in weights not found at {BUILTIN_MODEL_DIR}; set PTQ4DM_MODELS_DIR")
        return str(BUILTIN_MODEL_DIR)
    return str(name_or_path)


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> DiffusionModel:
    """Accept the diffusers pipeline layout (unet/, scheduler/) or a bare UNet folder with scheduler_config.json.

    Hub ids work when the network does; the built-in model never needs it.
    """
    source = resolve_model_path(name_or_path)
    local = Path(source)
    if local.exists():
        sub = "unet" if (local / "unet" / "config.json").exists() else None
        sched_sub = "scheduler" if (local / "scheduler" / "scheduler_config.json").exists() else None
        if sub is None and not (local / "config.json").exists():
            raise ValueError(f"model: {source} has neither unet/config.json nor config.json")
    else:
        sub, sched_sub = "unet", "scheduler"
    # low_cpu_mem_usage (diffusers' default) needs accelerate and otherwise warns on every start; for UNets of
    # this size the plain load is as fast, so ask for it instead of adding a dependency.
    unet = UNet2DModel.from_pretrained(source, subfolder=sub, low_cpu_mem_usage=False)
    try:
        scheduler_config = dict(DDPMScheduler.load_config(source, subfolder=sched_sub))
    except OSError:
        scheduler_config = dict(DDPMScheduler.load_config(source))
    unet.eval().requires_grad_(False).to(device)
    name = BUILTIN_MODEL_NAME if source == str(BUILTIN_MODEL_DIR) else str(name_or_path)
    return DiffusionModel(name=name, unet=unet, scheduler_config=scheduler_config,
                          path=local.resolve() if local.exists() else None)
