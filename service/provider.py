"""The worker's model provider: (model name, precision) -> a ready UNet with its version, swapped atomically.

fp32 is the loaded model itself; quantized precisions come from `quantizer.ptq.quantize_model` and run on the
configured execution backend (`quantizer.execution`: real int8 kernels where the CPU has them). A configured
precision this installation cannot run is not served (the API answers 422 with the served list).

Each variant becomes ready on its own and says where it is (`VariantStatus`: loading -> calibrating ->
compiling -> ready, or failed, with the calibration stage, fraction and ETA), so fp32 serves while a quantized
precision is still calibrating, and /readyz can show it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import sample
from quantizer.execution.executor import build_executor
from quantizer.ptq.cache import hash_state_dict
from quantizer.ptq.config import PRECISION_PRESETS, SERVING_PRESET
from quantizer.ptq.progress import ProgressLog, Snapshot

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
    cache_hit: bool | None = None  # quantized only: stats were read (shipped or cached), not calibrated
    stats_source: str | None = None  # quantized only: shipped | cache | calibrated
    backend: str = "eager"  # how the UNet executes (quantizer.execution)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])



VARIANT_STATES: tuple[str, ...] = ("loading", "calibrating", "compiling", "ready", "failed")


class Aborted(Exception):
    """The provider was told to stop (shutdown) while a variant was still being built."""


@dataclass
class VariantStatus:
    """Where one (model, precision) is on its way to serving. progress/eta_s belong to the current stage."""

    state: str = "loading"
    stage: str | None = None
    progress: float | None = None
    eta_s: float | None = None
    error: str | None = None
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelProvider:
    def __init__(self, model_paths: dict[str, str], precisions: Iterable[str], cache_dir: str,
                 device: str = "cpu", calibration: dict[str, Any] | None = None, backend: str = "auto",
                 max_batch_images: int = 32, compile_all_buckets: bool = False,
                 compile_cache_dir: str | None = None) -> None:
        self.model_paths = dict(model_paths)
        self.precisions = list(precisions)
        self.cache_dir = cache_dir
        self.device = device
        self.calibration = dict(calibration or {})
        self.backend = backend
        self.max_batch_images = max_batch_images
        self.compile_all_buckets = compile_all_buckets
        self.compile_cache_dir = compile_cache_dir
        self._base: dict[str, tuple[DiffusionModel, str]] = {}
        self._served: dict[tuple[str, str], ServedModel] = {}
        self._status: dict[tuple[str, str], VariantStatus] = {key: VariantStatus() for key in self.keys}
        self._lock = threading.Lock()
        self._abort = threading.Event()

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(m, p) for m in self.model_paths for p in self.precisions]

    def load(self) -> None:
        """Load every model and prepare every precision (blocking; the worker runs the steps in threads)."""
        self.load_base()
        for name, precision in self.keys:
            self.prepare(name, precision)

    def load_base(self) -> None:
        for name, path in self.model_paths.items():
            model = load_model(path, device=self.device)
            self._base[name] = (model, hash_state_dict(model.unet))

    def prepare(self, name: str, precision: str) -> ServedModel:
        """Build and warm one variant, reporting each state; a failure marks it failed and is re-raised."""
        try:
            served = self.build(name, precision)
            self.set_status(name, precision, "compiling")
            self._warm(served)
        except Exception as exc:
            self.set_status(name, precision, "failed", error=f"{type(exc).__name__}: {exc}")
            raise
        self._install(served)
        self.set_status(name, precision, "ready")
        return served

    def build(self, name: str, precision: str) -> ServedModel:
        """The first variant: quantized ones read the shipped stats or the calibration cache, or calibrate."""
        return self._build(name, precision, overrides=None, generation=1)

    def _warm(self, served: ServedModel) -> None:
        """Compile before serving (batch 1, or every bucket with compile_all_buckets) and run one tiny
        generation, so the first request does not pay for lazy initialisation. Other buckets compile on first
        use; backends with one dynamic-batch graph compile once either way."""
        if hasattr(served.unet, "warmup"):
            sizes = range(1, self.max_batch_images + 1) if self.compile_all_buckets else [1]
            seconds = served.unet.warmup(sizes)
            log.info("%s/%s on %s: compiled %s", served.name, served.precision, served.backend, seconds)
        sample(served.unet, served.scheduler_config, [0], sampler="ddim", steps=1)

    def get(self, name: str, precision: str) -> ServedModel:
        try:
            return self._served[(name, precision)]
        except KeyError:
            status = self._status.get((name, precision))
            if status is not None and status.state == "failed":
                raise KeyError(f"{name}/{precision} failed to load on this worker: {status.error}") from None
            raise KeyError(f"{name}/{precision} is not loaded by this worker") from None

    # -- state -----------------------------------------------------------------------------------------------------
    def status(self, name: str, precision: str) -> VariantStatus:
        return self._status[(name, precision)]

    def set_status(self, name: str, precision: str, state: str, **fields: Any) -> None:
        if state not in VARIANT_STATES:
            raise ValueError(f"state must be one of {', '.join(VARIANT_STATES)}, got {state!r}")
        self._status[(name, precision)] = VariantStatus(state=state, **fields)

    def settled_keys(self) -> list[tuple[str, str]]:
        """Variants whose jobs can be taken: ready ones run them, failed ones fail them with the reason."""
        return [key for key in self.keys if self._status[key].state in ("ready", "failed")]

    def any_ready(self) -> bool:
        return any(s.state == "ready" for s in self._status.values())

    def abort(self) -> None:
        """Shutdown: a calibration in progress stops at its next progress report (compiles run to the end)."""
        self._abort.set()

    def _calibration_progress(self, name: str, precision: str) -> ProgressLog:
        def listen(snapshot: Snapshot) -> None:
            if self._abort.is_set():
                raise Aborted(f"{name}/{precision}: calibration stopped by shutdown")
            self.set_status(name, precision, "calibrating", stage=snapshot.stage,
                            progress=round(snapshot.fraction, 4),
                            eta_s=None if snapshot.eta_s is None else round(snapshot.eta_s, 1))

        return ProgressLog(f"calibrating {name}/{precision}", log, listener=listen)

    def requantize(self, name: str, precision: str, overrides: dict[str, Any] | None) -> ServedModel:
        """Build the new variant off to the side, then swap it in with one assignment."""
        current = self.get(name, precision)
        fresh = self._build(name, precision, overrides, generation=current.generation + 1)
        self._warm(fresh)  # compile and run it before it serves
        self._install(fresh)
        return fresh

    def describe(self) -> list[dict]:
        """One row per configured variant: its state (and progress), plus what serves once it is built."""
        rows = []
        for name, precision in self.keys:
            row: dict[str, Any] = {"model": name, "precision": precision,
                                   **self._status[(name, precision)].as_dict()}
            served = self._served.get((name, precision))
            if served is not None:
                row.update(version=served.version, calibration_hash=served.calibration_hash,
                           generation=served.generation, cache_hit=served.cache_hit, stats_source=served.stats_source,
                           backend=served.backend)
            rows.append(row)
        return rows

    def _install(self, served: ServedModel) -> None:
        with self._lock:
            self._served[(served.name, served.precision)] = served

    def _build(self, name: str, precision: str, overrides: dict[str, Any] | None, generation: int) -> ServedModel:
        model, digest = self._base[name]
        if precision == "fp32":
            unet, calibration_hash, hit, source, backend = model.unet, None, None, None, "eager"
        else:
            if precision not in available_precisions():
                raise ValueError(f"precision {precision!r} is not available (served: "
                                 f"{', '.join(available_precisions())})")
            # A re-quantize builds beside the serving variant, whose state stays 'ready'; it only logs progress.
            first = (name, precision) not in self._served
            if first:
                self.set_status(name, precision, "calibrating")
            from quantizer.ptq.pipeline import quantize_model

            progress = self._calibration_progress(name, precision) if first else None
            config = {"preset": SERVING_PRESET, **self.calibration, **(overrides or {})}
            result = quantize_model(model, precision, config, self.cache_dir, progress=False, on_progress=progress)
            calibration_hash, hit, source = result.calibration_hash, bool(result.cache_hit), result.stats_source
            if first:
                self.set_status(name, precision, "compiling")
            unet = build_executor(result.unet, self.backend, max_batch=self.max_batch_images,
                                  cache_dir=self.compile_cache_dir)
            backend = getattr(unet, "backend", "fake")
        version = f"{digest[:12]}/{precision}/{(calibration_hash or 'none')[:12]}/r{generation}"
        return ServedModel(name, precision, unet, model.scheduler_config, version, calibration_hash, generation,
                           hit, source, backend)
