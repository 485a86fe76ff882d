"""The worker's model provider: (model name, precision) -> a ready UNet with its version, swapped atomically.

fp32 is the loaded model itself; quantized precisions come from `quantizer.ptq.quantize_model` and run on the
configured execution backend (`quantizer.execution`: real int8 kernels where the CPU has them). A configured
precision this installation cannot run is not served (the API answers 422 with the served list).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import sample
from quantizer.execution.executor import build_executor
from quantizer.ptq.cache import hash_state_dict
from quantizer.ptq.config import PRECISION_PRESETS

log = logging.getLogger(__name__)

def available_precisions() -> tuple[str, ...]:
    """What this installation can run: fp32 and the quantizer's presets (fake-quant runs on any device)."""
    return ("fp32", *(p for p in PRECISION_PRESETS if p != "fp32"))


def served_precisions(configured: Iterable[str]) -> list[str]:
    available = available_precisions()
    served = [p for p in configured if p in available]
    dropped = [p for p in configured if p not in available]
    if dropped:
        log.warning("precisions %s are not available in this installation; serving %s", dropped, served)
    return served


@dataclass(frozen=True)
class ServedModel:
    """An immutable snapshot: a batch holds one for its whole run, so a swap never mixes versions in a batch."""

    name: str
    precision: str
    unet: torch.nn.Module
    scheduler_config: dict
    version: str
    calibration_hash: str | None
    generation: int
    cache_hit: bool | None = None  # quantized only: stats came from the calibration cache
    backend: str = "eager"  # how the UNet executes (quantizer.execution)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])



class ModelProvider:
    def __init__(self, model_paths: dict[str, str], precisions: Iterable[str], cache_dir: str,
                 device: str = "cpu", calibration: dict[str, Any] | None = None, backend: str = "auto",
                 max_batch_images: int = 32) -> None:
        self.model_paths = dict(model_paths)
        self.precisions = list(precisions)
        self.cache_dir = cache_dir
        self.device = device
        self.calibration = dict(calibration or {})
        self.backend = backend
        self.max_batch_images = max_batch_images
        self._base: dict[str, tuple[DiffusionModel, str]] = {}
        self._served: dict[tuple[str, str], ServedModel] = {}
        self._lock = threading.Lock()

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(m, p) for m in self.model_paths for p in self.precisions]

    def load(self) -> None:
        """Load every model and build every precision (blocking; the worker runs the steps in threads)."""
        self.load_base()
        for name, precision in self.keys:
            self.build(name, precision)

    def load_base(self) -> None:
        for name, path in self.model_paths.items():
            model = load_model(path, device=self.device)
            self._base[name] = (model, hash_state_dict(model.unet))

    def build(self, name: str, precision: str) -> ServedModel:
        """The first variant: quantized ones read the calibration cache, or calibrate and fill it."""
        served = self._build(name, precision, overrides=None, generation=1)
        self._install(served)
        return served

    def warm_up(self) -> None:
        """Compile every batch-size bucket and run one tiny generation per served variant, so no request pays
        for lazy initialisation."""
        for served in list(self._served.values()):
            self._warm(served)

    def _warm(self, served: ServedModel) -> None:
        if hasattr(served.unet, "warmup"):
            seconds = served.unet.warmup(range(1, self.max_batch_images + 1))
            log.info("%s/%s on %s: compiled batch buckets %s", served.name, served.precision, served.backend,
                        seconds)
        sample(served.unet, served.scheduler_config, [0], sampler="ddim", steps=1)

    def get(self, name: str, precision: str) -> ServedModel:
        try:
            return self._served[(name, precision)]
        except KeyError:
            raise KeyError(f"{name}/{precision} is not loaded by this worker") from None

    def requantize(self, name: str, precision: str, overrides: dict[str, Any] | None) -> ServedModel:
        """Build the new variant off to the side, then swap it in with one assignment."""
        current = self.get(name, precision)
        fresh = self._build(name, precision, overrides, generation=current.generation + 1)
        self._warm(fresh)  # compile and run it before it serves
        self._install(fresh)
        return fresh

    def describe(self) -> list[dict]:
        return [{"model": s.name, "precision": s.precision, "version": s.version,
                 "calibration_hash": s.calibration_hash, "generation": s.generation, "cache_hit": s.cache_hit,
                 "backend": s.backend}
                for s in list(self._served.values())]

    def _install(self, served: ServedModel) -> None:
        with self._lock:
            self._served[(served.name, served.precision)] = served

    def _build(self, name: str, precision: str, overrides: dict[str, Any] | None, generation: int) -> ServedModel:
        model, digest = self._base[name]
        if precision == "fp32":
            unet, calibration_hash, hit, backend = model.unet, None, None, "eager"
        else:
            unet, calibration_hash, hit = quantize(model, precision, {**self.calibration, **(overrides or {})},
                                                   self.cache_dir)
            unet = build_executor(unet, self.backend, max_batch=self.max_batch_images)
            backend = getattr(unet, "backend", "fake")
        version = f"{digest[:12]}/{precision}/{(calibration_hash or 'none')[:12]}/r{generation}"
        return ServedModel(name, precision, unet, model.scheduler_config, version, calibration_hash, generation,
                           hit, backend)


def quantize(model: DiffusionModel, precision: str, overrides: dict[str, Any],
             cache_dir: str) -> tuple[torch.nn.Module, str | None, bool]:
    """The hook to the quantizer's PTQ entry point: the fake-quant model, which `build_executor` then lowers."""
    if precision not in available_precisions():
        raise ValueError(f"precision {precision!r} is not available (served: {', '.join(available_precisions())})")
    from quantizer.ptq.pipeline import quantize_model

    result = quantize_model(model, precision, overrides or None, cache_dir, progress=False)
    return result.unet, result.calibration_hash, bool(result.cache_hit)
