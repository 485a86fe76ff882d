"""What the API needs to know about a served model without loading it: image size and whether it takes a prompt.

Read from the diffusers configs on disk (`quantizer.diffusion.kinds`, torch-free), because an API-only process never
imports torch or diffusers. A latent model's size is its decoded one (the latent size times the VAE's upsampling).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from quantizer.diffusion.kinds import image_size, resolve_model_path, unet_config_path


@dataclass(frozen=True)
class ModelInfo:
    width: int | None  # None: not a local model (a hub id), so the size is not known up front
    height: int | None
    takes_prompt: bool

    @property
    def size(self) -> str | None:
        """OpenAI's WIDTHxHEIGHT."""
        return None if self.width is None else f"{self.width}x{self.height}"


@functools.lru_cache(maxsize=64)
def model_info(path: str) -> ModelInfo:
    """`path` as in ServiceSettings.model_paths. Unconditional UNets (every model served today) take no prompt."""
    try:
        local = Path(resolve_model_path(path))
    except ValueError:  # the built-in weights are not installed in this process's filesystem
        return ModelInfo(None, None, takes_prompt=False)
    config_file = unet_config_path(local) if local.is_dir() else None
    if config_file is None:
        return ModelInfo(None, None, takes_prompt=False)
    config = json.loads(config_file.read_text())
    height, width = image_size(local) or (None, None)
    takes_prompt = config.get("cross_attention_dim") is not None or "Condition" in str(config.get("_class_name"))
    return ModelInfo(width, height, takes_prompt)
