"""What the API needs to know about a served model without loading it: image size and whether it takes a prompt.

Read from the diffusers config on disk, because an API-only process never imports torch or diffusers.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from quantizer.constants import BUILTIN_MODEL_NAME


@dataclass(frozen=True)
class ModelInfo:
    width: int | None  # None: not a local model (a hub id), so the size is not known up front
    height: int | None
    takes_prompt: bool

    @property
    def size(self) -> str | None:
        """OpenAI's WIDTHxHEIGHT."""
        return None if self.width is None else f"{self.width}x{self.height}"


def _local_dir(path: str) -> Path:
    """The same rule as quantizer.diffusion.models (which imports torch): the built-in name lives under MODELS_DIR."""
    if path == BUILTIN_MODEL_NAME:
        root = os.environ.get("PTQ4DM_MODELS_DIR") or Path(__file__).resolve().parents[1] / "models"
        return Path(root) / BUILTIN_MODEL_NAME
    return Path(path)


@functools.lru_cache(maxsize=64)
def model_info(path: str) -> ModelInfo:
    """`path` as in ServiceSettings.model_paths. Unconditional UNets (every model served today) take no prompt."""
    local = _local_dir(path)
    config_file = next((f for f in (local / "unet" / "config.json", local / "config.json") if f.is_file()), None)
    if config_file is None:
        return ModelInfo(None, None, takes_prompt=False)
    config = json.loads(config_file.read_text())
    size = config.get("sample_size")
    height, width = (size, size) if isinstance(size, int) else (None, None) if size is None else tuple(size)
    takes_prompt = config.get("cross_attention_dim") is not None or "Condition" in str(config.get("_class_name"))
    return ModelInfo(width, height, takes_prompt)
