"""The worker: its loops, under one task group, around the job runner (service/job_runner.py).

  batches    read a batch from the work stream -> JobRunner.process (engine -> PNG -> store -> ack)
  prepare    calibrate and compile the quantized variants one by one, after fp32 serves
  heartbeat  publish this worker's state on the control bus and renew the leases of the entries in hand
  control    collect re-quantize requests (the batch loop applies them between batches)
  webhooks   the webhook dispatcher (service/dispatcher.py), delivering the outbox

request_stop() ends the batch loop after the batch in hand; the others notice within one block_ms. A loop that
crashes stops the worker the same way, and run() raises its error once every loop is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from service.dispatcher import WebhookDispatcher
from service.job_runner import JobRunner
from service.jobs import stream_name
from service.metrics import Metrics
from service.provider import ModelProvider
from service.queue.base import Delivery, QueueBackend, QueueUnavailable
from service.retrying import Retrying
from service.settings import ServiceSettings
from service.threads import in_thread

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: ServiceSettings, backend: QueueBackend, provider: ModelProvider,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.stream, self.bus = backend.stream, backend.bus
        self.provider = provider
        self.metrics = metrics or Metrics()
        self.id = settings.consumer_name
        self.streams = [stream_name(m, p) for m, p in provider.keys]
        self.state = "starting"  # starting -> ready <-> requantizing -> stopping -> stopped | failed
        self.error: str | None = None
        self.started_at = time.time()
        self._stop = asyncio.Event()  # SIGTERM: read no more
        self._done = asyncio.Event()  # the batch loop is over: the other loops end (they renew leases till then)
        self._prepared = asyncio.Event()
        self._stopping_loops: set[asyncio.Timeout] = set()
        self._next_reclaim = 0.0
        self._control_last: str | None = None
        self._ops: list[dict] = []
        self.retrying = Retrying(settings.lease_ms, self._stop)
        self.runner = JobRunner(settings, backend.store, backend.stream, provider, self.metrics, self.id,
                                self.retrying)
        self.webhooks = WebhookDispatcher(settings, backend.stream, backend.store, self.id, self.metrics)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    @property
    def queue_ok(self) -> bool:
        return self.retrying.queue_ok

    @queue_ok.setter
    def queue_ok(self, ok: bool) -> None:
        self.retrying.queue_ok = ok

    @property
    def jobs_done(self) -> int:
        return self.runner.jobs_done

    @property
    def ready(self) -> bool:
        """Serving at least one variant (the others may still be calibrating or compiling)."""
        return self.state in ("ready", "requantizing") and self.queue_ok and self.provider.any_ready()

    @property
    def started(self) -> bool:
        return self.state not in ("starting",)

    def request_stop(self) -> None:
        """SIGTERM: stop reading; the batch in hand is finished and acked, then run() returns."""
        if self.state not in ("stopped", "failed"):
            self.state = "stopping"
        self._stop.set()
        self.provider.abort()

    async def start(self) -> None:
        """Load the models and make fp32 ready, make sure the streams exist, then report ready.

        Quantized precisions are prepared afterwards, by run()'s `prepare` loop, one at a time: each starts serving
        when it is ready, and its jobs wait in its stream until then.
        """
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        try:
            await in_thread(self.provider.load_base)
            for name, precision in self.provider.keys:
                if precision == "fp32":
                    await in_thread(self.provider.prepare, name, precision)
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        await self.retrying(lambda: self.stream.ensure_streams(self.streams), forever=True)
        self._control_last, _ = await self.retrying(lambda: self.bus.read_control(None, 0), forever=True)
        self.state = "ready"
        await self._beat()

    async def run(self) -> None:
        """Serve until request_stop(); start() must have succeeded. Raises the error of a loop that crashed."""
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "batches": self._batch_loop, "prepare": self._prepare_quantized, "heartbeat": self._heartbeat_loop,
            "control": self._control_loop, "webhooks": lambda: self.webhooks.run(self._done)}
        crashed: list[Exception] = []
        try:
            async with asyncio.TaskGroup() as group:
                for name, loop in loops.items():
                    group.create_task(self._supervised(name, loop, crashed), name=f"worker {self.id}: {name}")
        finally:
            self.state = "failed" if crashed else "stopped"
            with contextlib.suppress(QueueUnavailable):
                await self.bus.remove_worker(self.id)
        if crashed:
            raise crashed[0]

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]], crashed: list[Exception]) -> None:
        """One loop of the group. A crash stops the worker (recorded for run() to raise) rather than cancelling the
        others: cancelling a blocked redis-py read can hang, so each loop ends by itself once `_done` is set, and
        is cancelled only if it has not after a grace period (see _finish)."""
        try:
            async with asyncio.timeout(None) as deadline:
                self._stopping_loops.add(deadline)
                try:
                    await loop()
                finally:
                    self._stopping_loops.discard(deadline)
        except TimeoutError:
            if not deadline.expired():
                raise
            log.warning("worker %s: the %s loop did not stop within its grace period; cancelled", self.id, name)
        except Exception as exc:
            log.exception("worker %s: the %s loop crashed; stopping", self.id, name)
            self.error = f"{name} loop crashed: {type(exc).__name__}: {exc}"
            crashed.append(exc)
            self.request_stop()  # the batch loop ends after its batch in hand, and its _finish ends the others

    def _finish(self) -> None:
        """The batch loop is over: the other loops stop within one block_ms, or are cancelled after the grace."""
        self._done.set()
        grace_s = 5 + 2 * self.settings.block_ms / 1000
        when = asyncio.get_running_loop().time() + grace_s
        for deadline in self._stopping_loops:
            deadline.reschedule(when)

    async def prepared(self) -> None:
        """Wait until every quantized variant is ready or failed (while run() runs)."""
        await self._prepared.wait()

    async def _sleep(self, seconds: float, until: asyncio.Event | None = None) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for((until or self._stop).wait(), seconds)

    # -- batches ---------------------------------------------------------------------------------------------------
    async def _batch_loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    await self._apply_ops()
                    deliveries = await self._next_batch()
                    self.queue_ok = True
                    if deliveries:
                        await self.runner.process(deliveries)
                except QueueUnavailable as exc:
                    self.queue_ok = False
                    log.warning("worker %s: queue unavailable (%s); retrying", self.id, exc)
                    await self._sleep(0.5)
        finally:
            self._finish()

    def _live_streams(self) -> list[str]:
        """Streams of the variants that can take jobs now (ready, or failed: their jobs fail with the reason)."""
        return [stream_name(m, p) for m, p in self.provider.settled_keys()]

    async def _next_batch(self) -> list[Delivery]:
        s = self.settings
        out: list[Delivery] = []
        streams = self._live_streams()
        if not streams:  # nothing ready yet: jobs wait in their streams
            await self._sleep(s.block_ms / 1000)
            return out
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + s.lease_ms / 2000
            for stream in streams:
                out += await self.stream.reclaim(stream, self.id, s.lease_ms, s.max_batch - len(out))
                if len(out) >= s.max_batch:
                    return out
        out += await self.stream.read(streams, self.id, s.max_batch - len(out), 0 if out else s.block_ms)
        if out and len(out) < s.max_batch and s.max_wait_ms > 0:
            # Sleep here rather than XREADGROUP BLOCK max_wait_ms: Redis rounds short block timeouts up to its
            # event-loop tick (~10 ms measured), which a lone job would pay on every dispatch.
            await asyncio.sleep(s.max_wait_ms / 1000)
            out += await self.stream.read(streams, self.id, s.max_batch - len(out), 0)
        return out

    # -- preparing the quantized variants --------------------------------------------------------------------------
    async def _prepare_quantized(self) -> None:
        """Calibrate (or read the stats) and compile each quantized variant; a failure fails that variant only."""
        try:
            for name, precision in self.provider.keys:
                if precision == "fp32" or self._stop.is_set():
                    continue
                try:
                    self.provider.set_status(name, precision, "calibrating", stage="waiting for the calibration lock")
                    async with self._calibration_lock(f"calibrate:{name}:{precision}"):
                        await in_thread(self.provider.prepare, name, precision)
                    log.info("worker %s: %s/%s ready", self.id, name, precision)
                except Exception as exc:
                    if self._stop.is_set():
                        return
                    log.exception("worker %s: %s/%s failed to load; its jobs fail with the reason", self.id, name,
                                  precision)
                    if self.provider.status(name, precision).state != "failed":
                        self.provider.set_status(name, precision, "failed", error=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(QueueUnavailable):
                    await self._beat()
        finally:
            self._prepared.set()

    @contextlib.asynccontextmanager
    async def _calibration_lock(self, name: str) -> AsyncIterator[None]:
        """Workers starting together calibrate once: the others wait, then read the stats from the cache."""
        ttl = self.settings.calibration_lock_ms
        while not await self.retrying(lambda: self.bus.acquire_lock(name, self.id, ttl), forever=True):
            await asyncio.sleep(0.2)
        try:
            yield
        finally:
            with contextlib.suppress(QueueUnavailable):
                await self.bus.release_lock(name, self.id)

    # -- heartbeat, leases, control --------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"id": self.id, "state": self.state, "ready": self.ready, "host": socket.gethostname(),
                "pid": os.getpid(), "started_at": self.started_at, "last_seen": time.time(),
                "jobs_done": self.jobs_done, "streams": self.streams, "models": self.provider.describe(),
                "error": self.error}

    async def _beat(self) -> None:
        ttl = 3 * self.settings.heartbeat_ms / 1000
        await self.bus.heartbeat(self.id, self.info(), ttl)
        if self.runner.held:
            await self.stream.renew(list(self.runner.held.values()), self.id)

    async def _heartbeat_loop(self) -> None:
        while not self._done.is_set():
            try:
                await self._beat()
                self.queue_ok = True
            except QueueUnavailable:
                self.queue_ok = False
            except Exception:
                log.exception("worker %s: heartbeat failed", self.id)
            await self._sleep(self.settings.heartbeat_ms / 1000, self._done)

    async def _control_loop(self) -> None:
        """Collect re-quantize requests for our models; the batch loop applies them between batches."""
        while not self._done.is_set():
            try:
                last, messages = await self.bus.read_control(self._control_last, self.settings.block_ms)
                self._control_last = last
                for m in messages:
                    if m.get("type") == "requantize" and m.get("model") in self.provider.model_paths:
                        self._ops.append(m)
            except QueueUnavailable:
                await self._sleep(0.5, self._done)
            except Exception:
                log.exception("worker %s: control channel failed", self.id)
                await self._sleep(0.5, self._done)

    async def _apply_ops(self) -> None:
        """Re-quantize between batches: build off to the side, swap atomically, report per worker."""
        while self._ops:
            op = self._ops.pop(0)
            precisions = [op["precision"]] if op.get("precision") else self.provider.precisions
            self.state = "requantizing"
            await self._beat()
            result: dict = {"worker": self.id, "state": "done", "models": []}
            try:
                for precision in precisions:
                    if (op["model"], precision) not in self.provider.keys:
                        continue
                    fresh = await in_thread(self.provider.requantize, op["model"], precision,
                                            op.get("calibration"))
                    result["models"].append({"precision": precision, "version": fresh.version,
                                             "calibration_hash": fresh.calibration_hash})
                self.metrics.requantizations.labels("ok").inc()
            except Exception as exc:
                log.exception("worker %s: re-quantize failed", self.id)
                result.update(state="failed", error=f"{type(exc).__name__}: {exc}")
                self.metrics.requantizations.labels("failed").inc()
            finally:
                self.state = "stopping" if self._stop.is_set() else "ready"
            await self.retrying(lambda op=op, result=result: self.bus.set_operation(
                op["id"], {f"worker:{self.id}": result}, self.settings.result_ttl_s))
            await self._beat()
