"""Names and defaults a process without the ML stack needs (the API): importing this never imports torch.

`quantizer.diffusion.models`, `quantizer.ptq.cache` and `quantizer.ptq.config` re-export these.
"""

from __future__ import annotations

BUILTIN_MODEL_NAME = "fashion-mnist-ddpm"
# Relative to the working directory: the repository checkout, or the image's volume via the service setting.
DEFAULT_CALIBRATION_CACHE_DIR = "runs/calibration-cache"
# The preset the CLI and the service quantize with unless told otherwise (quantizer.ptq.config.PRESETS).
SERVING_PRESET = "faithful"
PRECISION_PRESETS: tuple[str, ...] = ("fp32", "w8a8", "w7a8", "w4a8", "w8a6", "w8a16")
