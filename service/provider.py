"""The worker's model provider: (model name, precision) -> a ready UNet with its version, swapped atomically.

fp32 is the loaded model itself; quantized precisions come from `Engine.quantize` (PTQ4DM) and run on the
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

from torch import nn

from quantizer.constants import SERVING_PRESET
from quantizer.engine import Engine
from quantizer.ptq.progress import ProgressLog, Snapshot
from service.settings import available_precisions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """An immutable snapshot: a batch holds one for its whole run, so a swap never mixes versions in a batch."""

    name: str
    precision: str
    engine: Engine  # what generates; its backend, calibration hash and stats source describe the variant
    version: str
    generation: int

    @property
    def unet(self) -> nn.Module:
        return self.engine.unet

    @property
    def scheduler_config(self) -> dict:
        return self.engine.scheduler_config

    @property
    def calibration_hash(self) -> str | None:
        return self.engine.calibration_hash


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
        self._base: dict[str, Engine] = {}  # the fp32 engine of each model
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
            self._base[name] = Engine.load(path, device=self.device)

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
        sizes = range(1, self.max_batch_images + 1) if self.compile_all_buckets else [1]
        seconds = served.engine.warm(sizes)
        if seconds is not None:
            log.info("%s/%s on %s: compiled %s", served.name, served.precision, served.engine.backend, seconds)

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
                engine = served.engine
                row.update(version=served.version, calibration_hash=engine.calibration_hash,
                           generation=served.generation, cache_hit=engine.cache_hit, stats_source=engine.stats_source,
                           backend=engine.backend)
            rows.append(row)
        return rows

    def _install(self, served: ServedModel) -> None:
        with self._lock:
            self._served[(served.name, served.precision)] = served

    def _build(self, name: str, precision: str, overrides: dict[str, Any] | None, generation: int) -> ServedModel:
        base = self._base[name]
        if precision == "fp32":
            engine = base
        else:
            if precision not in available_precisions():
                raise ValueError(f"precision {precision!r} is not available (served: "
                                 f"{', '.join(available_precisions())})")
            # A re-quantize builds beside the serving variant, whose state stays 'ready'; it only logs progress.
            first = (name, precision) not in self._served
            if first:
                self.set_status(name, precision, "calibrating")
            progress = self._calibration_progress(name, precision) if first else None
            config = {"preset": SERVING_PRESET, **self.calibration, **(overrides or {})}
            quantized = base.quantize(precision, config, self.cache_dir, on_progress=progress)
            if first:
                self.set_status(name, precision, "compiling")
            engine = quantized.compile(self.backend, self.max_batch_images, self.compile_cache_dir)
        version = f"{base.digest[:12]}/{precision}/{(engine.calibration_hash or 'none')[:12]}/r{generation}"
        return ServedModel(name, precision, engine, version, generation)
