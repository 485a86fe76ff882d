"""Execution backends: how a (possibly quantized) UNet actually runs (see `quantizer.execution.executor`).

The public names are re-exported lazily, so `import quantizer.execution` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BACKENDS", "Backend", "BackendUnavailable", "ExecutableUNet", "build_executor", "register_backend",
           "resolve_backend", "unregister_backend"]
_FROM_REGISTRY = {"Backend", "register_backend", "unregister_backend"}


def __getattr__(name: str) -> Any:
    if name in _FROM_REGISTRY:
        from quantizer.execution import backends

        return getattr(backends, name)
    if name in __all__:
        from quantizer.execution import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
