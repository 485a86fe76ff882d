"""PTQ4DM: calibration sets, scale search, fake-quant layers and the calibration cache.

`quantize_model` (the worker's one call) is re-exported lazily, so importing a light submodule such as
`quantizer.ptq.cache` does not load the calibration pipeline and diffusers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QuantizedModel", "build_config", "quantize_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from quantizer.ptq import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
