"""Execution backends: how a (possibly quantized) UNet actually runs (see `quantizer.execution.executor`).

The public names are re-exported lazily, so `import quantizer.execution` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "BackendUnavailable", "ExecutableUNet", "build_executor", "resolve_backend"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from quantizer.execution import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
