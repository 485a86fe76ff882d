"""The worker loop: read a batch -> start jobs -> group compatible ones -> generate passes -> store PNGs -> ack.

Everything that touches the model goes through `quantizer.engine.Engine` (held by the provider's ServedModel).

At-least-once: an entry is acked only after its job reached a final state (results stored first), and entries
this worker holds have their lease renewed by the heartbeat; a dead worker's entries go idle and are reclaimed
by another worker (XAUTOCLAIM). A job delivered more than `max_deliveries` times is failed (dead-letter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import numpy as np

from quantizer.diffusion.images import png_bytes
from quantizer.engine import Generation
from service import events
from service.batching import ImageSlot, group_compatible, pack_passes, passes_per_job
from service.dispatcher import WebhookDispatcher
from service.jobs import ACTIVE, JobRecord, stream_name
from service.metrics import Metrics
from service.provider import ModelProvider, ServedModel
from service.queue.base import Delivery, JobQueue, QueueUnavailable
from service.settings import ServiceSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """asyncio.to_thread, except that a StopIteration escaping `fn` fails the caller: asyncio cannot set it on a
    future, so a bare to_thread would leave the awaiting task pending forever."""
    def call() -> T:
        try:
            return fn(*args)
        except StopIteration as exc:
            raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} raised StopIteration") from exc

    return await asyncio.to_thread(call)


class _AllCancelled(Exception):
    """Raised from the step callback: every job in the pass was cancelled, stop between denoising steps."""


class Worker:
    def __init__(self, settings: ServiceSettings, queue: JobQueue, provider: ModelProvider,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.provider = provider
        self.metrics = metrics or Metrics()
        self.id = settings.consumer_name
        self.streams = [stream_name(m, p) for m, p in provider.keys]
        self.state = "starting"  # starting -> ready <-> requantizing -> stopping -> stopped | failed
        self.error: str | None = None
        self.queue_ok = True
        self.started_at = time.time()
        self.jobs_done = 0
        self._held: dict[str, Delivery] = {}
        self._stop = asyncio.Event()  # SIGTERM: read no more
        self._done = asyncio.Event()  # run() is over: heartbeat and control loops end (they renew leases till then)
        self._next_reclaim = 0.0
        self._control_last: str | None = None
        self._ops: list[dict] = []
        self._preparing: asyncio.Task | None = None
        self.webhooks = WebhookDispatcher(settings, queue, self.id, self.metrics)

    # -- lifecycle -------------------------------------------------------------------------------------------------
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

        Quantized precisions are prepared afterwards in the background (`_prepare_quantized`), one at a time:
        each starts serving when it is ready, and its jobs wait in its stream until then.
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
        await self._retrying(lambda: self.queue.ensure_streams(self.streams), forever=True)
        self._control_last, _ = await self._retrying(lambda: self.queue.read_control(None, 0), forever=True)
        self.state = "ready"
        self._preparing = asyncio.create_task(self._prepare_quantized())
        await self._beat()

    async def _prepare_quantized(self) -> None:
        """Calibrate (or read the stats) and compile each quantized variant; a failure fails that variant only."""
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

    async def prepared(self) -> None:
        """Wait until every quantized variant is ready or failed (start() must have run)."""
        if self._preparing is not None:
            await asyncio.shield(self._preparing)

    def _live_streams(self) -> list[str]:
        """Streams of the variants that can take jobs now (ready, or failed: their jobs fail with the reason)."""
        return [stream_name(m, p) for m, p in self.provider.settled_keys()]

    @contextlib.asynccontextmanager
    async def _calibration_lock(self, name: str) -> AsyncIterator[None]:
        """Workers starting together calibrate once: the others wait, then read the stats from the cache."""
        ttl = self.settings.calibration_lock_ms
        while not await self._retrying(lambda: self.queue.acquire_lock(name, self.id, ttl), forever=True):
            await asyncio.sleep(0.2)
        try:
            yield
        finally:
            with contextlib.suppress(QueueUnavailable):
                await self.queue.release_lock(name, self.id)

    async def run(self) -> None:
        """Serve until request_stop(); start() must have succeeded."""
        beats = asyncio.create_task(self._heartbeat_loop())
        control = asyncio.create_task(self._control_loop())
        hooks = asyncio.create_task(self.webhooks.run(self._done))
        try:
            while not self._stop.is_set():
                try:
                    await self._apply_ops()
                    deliveries = await self._next_batch()
                    self.queue_ok = True
                    if deliveries:
                        await self.process(deliveries)
                except QueueUnavailable as exc:
                    self.queue_ok = False
                    log.warning("worker %s: queue unavailable (%s); retrying", self.id, exc)
                    await self._sleep(0.5)
        finally:
            # The loops notice _done within one block_ms; cancelling a blocked redis-py read can hang instead.
            self._done.set()
            loops = {beats, control, hooks} | ({self._preparing} if self._preparing is not None else set())
            _, pending = await asyncio.wait(loops, timeout=5 + 2 * self.settings.block_ms / 1000)
            for task in pending:
                task.cancel()
            self.state = "stopped"
            with contextlib.suppress(QueueUnavailable):
                await self.queue.remove_worker(self.id)

    async def _sleep(self, seconds: float, until: asyncio.Event | None = None) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for((until or self._stop).wait(), seconds)

    # -- reading ---------------------------------------------------------------------------------------------------
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
                out += await self.queue.reclaim(stream, self.id, s.lease_ms, s.max_batch - len(out))
                if len(out) >= s.max_batch:
                    return out
        out += await self.queue.read(streams, self.id, s.max_batch - len(out), 0 if out else s.block_ms)
        if out and len(out) < s.max_batch and s.max_wait_ms > 0:
            # Sleep here rather than XREADGROUP BLOCK max_wait_ms: Redis rounds short block timeouts up to its
            # event-loop tick (~10 ms measured), which a lone job would pay on every dispatch.
            await asyncio.sleep(s.max_wait_ms / 1000)
            out += await self.queue.read(streams, self.id, s.max_batch - len(out), 0)
        return out

    # -- processing ------------------------------------------------------------------------------------------------
    async def process(self, deliveries: list[Delivery]) -> None:
        """Run one batch of deliveries to their final states; each is acked exactly when its job is settled."""
        self._held.update({d.msg_id: d for d in deliveries})
        try:
            started: dict[str, tuple[Delivery, JobRecord]] = {}
            for d in deliveries:
                job = await self._begin(d)
                if job is not None:
                    started[job.id] = (d, job)
            for group in group_compatible(job for _, job in started.values()):
                await self._run_group(group, {j.id: started[j.id][0] for j in group})
        finally:
            for d in deliveries:
                self._held.pop(d.msg_id, None)

    async def _begin(self, d: Delivery) -> JobRecord | None:
        """queued/running -> running (counting the delivery), or settle the entry right away."""
        s, q = self.settings, self.queue
        job = await q.get(d.job_id)
        if job is None or job.terminal:  # expired, cancelled, or finished by a previous holder
            await q.ack(d)
            return None
        attempts = job.attempts + 1
        if attempts > s.max_deliveries:
            msg = (f"dead-lettered: delivered {attempts} times without finishing (max_deliveries="
                   f"{s.max_deliveries}); the job may be crashing its workers")
            await self._fail(d, job, msg, "dead_letter", attempts=attempts)
            return None
        try:
            served = self.provider.get(job.model, job.precision)
            served.engine.validate(job.sampler, job.steps, job.eta, job.n, job.class_labels, job.prompt,
                                   job.negative_prompt, job.guidance_scale)
        except (KeyError, ValueError) as exc:
            await self._fail(d, job, str(exc).strip("'\""), "invalid", attempts=attempts)
            return None
        now = time.time()
        running = await q.transition(job.id, "running", ACTIVE, s.result_ttl_s, emit=events.started(job.id, job.steps),
                                     started_at=now, worker=self.id, attempts=attempts, progress_step=0,
                                     progress_total=job.steps)
        if running is None:
            await q.ack(d)
            return None
        self.metrics.wait_seconds.observe(max(0.0, now - job.created_at))
        return running

    async def _run_group(self, group: list[JobRecord], deliveries: dict[str, Delivery]) -> None:
        """One model snapshot for the whole group: a re-quantize never mixes versions within a job."""
        served = self.provider.get(group[0].model, group[0].precision)
        spec = group[0]
        passes = pack_passes(group, self.settings.max_batch_images)
        job_passes = passes_per_job(passes)
        jobs = {j.id: j for j in group}
        images: dict[str, dict[int, np.ndarray]] = {j.id: {} for j in group}
        labels: dict[str, dict[int, int]] = {j.id: {} for j in group}  # as run (class-conditional models)
        remaining = {job_id: len(idx) for job_id, idx in job_passes.items()}
        compute = dict.fromkeys(jobs, 0.0)
        settled: set[str] = set()
        stopped: set[str] = set()  # cancelled or gone: skip their remaining passes
        loop = asyncio.get_running_loop()
        for index, p in enumerate(passes):
            slots = [slot for slot in p.slots if slot.job_id not in stopped and slot.job_id not in settled]
            if not slots:
                continue
            live = list(dict.fromkeys(slot.job_id for slot in slots))
            self.metrics.batch_size.observe(len(slots))
            began = time.perf_counter()
            try:
                out = await in_thread(self._sample_pass, loop, served, spec, slots, index, job_passes, stopped)
            except _AllCancelled:
                continue
            except Exception as exc:  # a bad batch fails its jobs instead of being retried forever
                log.exception("worker %s: pass failed", self.id)
                for job_id in live:
                    await self._fail(deliveries[job_id], jobs[job_id], f"generation failed: {exc}", "error")
                    settled.add(job_id)
                continue
            for job_id in live:
                compute[job_id] += time.perf_counter() - began
            for job_id, error in diverged(slots, out.non_finite, spec.precision).items():  # those jobs, not the pass
                await self._fail(deliveries[job_id], jobs[job_id], error, "non_finite")
                settled.add(job_id)
            for i, (slot, img) in enumerate(zip(slots, out.images, strict=True)):
                if slot.job_id not in settled:
                    images[slot.job_id][slot.k] = img
                    if out.class_labels is not None:
                        labels[slot.job_id][slot.k] = out.class_labels[i]
            live = [job_id for job_id in live if job_id not in settled]
            for job_id in live:
                remaining[job_id] -= 1
                if remaining[job_id] == 0 and job_id not in stopped:
                    await self._succeed(deliveries[job_id], jobs[job_id], images.pop(job_id), labels.pop(job_id),
                                        served, len(job_passes[job_id]), compute[job_id])
                    settled.add(job_id)
        for job_id in jobs.keys() - settled:  # cancelled while running: nothing to store
            self.metrics.jobs_finished.labels("cancelled").inc()
            await self.queue.ack(deliveries[job_id])

    def _sample_pass(self, loop: asyncio.AbstractEventLoop, served: ServedModel, spec: JobRecord,
                     slots: list[ImageSlot], index: int, job_passes: dict[str, list[int]],
                     stopped: set[str]) -> Generation:
        """Runs in a thread; the step callback reports progress and learns about cancellations."""
        job_ids = list(dict.fromkeys(slot.job_id for slot in slots))

        interval = self.settings.progress_interval_ms / 1000
        last_write = -float("inf")

        def on_step(i: int, total: int, _t: int, _x: object) -> None:
            # One Redis round trip per report: throttled, so short steps are not dominated by bookkeeping.
            nonlocal last_write
            now = time.monotonic()
            if now - last_write < interval:
                return
            last_write = now
            progress = {j: (job_passes[j].index(index) * total + i, total * len(job_passes[j])) for j in job_ids}
            try:
                statuses = asyncio.run_coroutine_threadsafe(self.queue.set_progress(progress), loop).result(30)
            except (QueueUnavailable, TimeoutError):
                return  # keep computing; storing the result retries
            stopped.update(j for j, status in statuses.items() if status != "running")
            if all(j in stopped for j in job_ids):
                raise _AllCancelled

        labels = [slot.class_label for slot in slots]
        text = {}
        if any(slot.prompt is not None for slot in slots):  # text-to-image: every job of the pass has one
            text = {"prompts": [slot.prompt for slot in slots],
                    "negative_prompts": [slot.negative_prompt for slot in slots],
                    "guidance_scales": [slot.guidance_scale for slot in slots]}
        return served.engine.generate([slot.seed for slot in slots], sampler=spec.sampler, steps=spec.steps,
                                      eta=spec.eta, on_step=on_step,
                                      class_labels=None if all(c is None for c in labels) else labels, **text)

    async def _succeed(self, d: Delivery, job: JobRecord, images: dict[int, np.ndarray], labels: dict[int, int],
                       served: ServedModel, n_passes: int, compute_s: float) -> None:
        s = self.settings
        pngs = [png_bytes(images[k]) for k in range(job.n)]
        await self._retrying(lambda: self.queue.store_images(job.id, pngs, s.result_ttl_s))
        total = job.steps * n_passes
        # The labels as run: the record then says which class each image is, also where they were drawn.
        ran = {"class_labels": [labels[k] for k in range(job.n)]} if len(labels) == job.n else {}
        done = await self._retrying(lambda: self.queue.transition(
            job.id, "succeeded", ("running",), s.result_ttl_s, emit=events.succeeded(job.id, job.n),
            finished_at=time.time(), progress_step=total,
            progress_total=total, model_version=served.version, calibration_hash=served.calibration_hash,
            compute_s=round(compute_s, 6), **ran))
        await self._retrying(lambda: self.queue.ack(d))
        if done is not None:
            self.jobs_done += 1
            self.metrics.images.inc(job.n)
            self.metrics.jobs_finished.labels("succeeded").inc()
            self.metrics.run_seconds.observe(max(0.0, done.finished_at - (done.started_at or done.finished_at)))
        else:
            self.metrics.jobs_finished.labels("cancelled").inc()

    async def _fail(self, d: Delivery, job: JobRecord, error: str, reason: str, **fields: object) -> None:
        await self._retrying(lambda: self.queue.transition(
            job.id, "failed", ACTIVE, self.settings.result_ttl_s, emit=events.failed(job.id, error), error=error,
            finished_at=time.time(), **fields))
        await self._retrying(lambda: self.queue.ack(d))
        self.metrics.failures.labels(reason).inc()
        self.metrics.jobs_finished.labels("failed").inc()

    async def _retrying(self, call: Callable[[], Awaitable[T]], forever: bool = False) -> T:
        """Ride out a short queue outage (Redis restart) instead of dropping finished work.

        Gives up after one lease: by then the entry may be reclaimed elsewhere, and the job is re-run there.
        """
        deadline = time.monotonic() + self.settings.lease_ms / 1000
        while True:
            try:
                return await call()
            except QueueUnavailable:
                if (forever and self._stop.is_set()) or (not forever and time.monotonic() >= deadline):
                    raise
                self.queue_ok = False
                await asyncio.sleep(0.2)

    # -- heartbeat, leases, control --------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"id": self.id, "state": self.state, "ready": self.ready, "host": socket.gethostname(),
                "pid": os.getpid(), "started_at": self.started_at, "last_seen": time.time(),
                "jobs_done": self.jobs_done, "streams": self.streams, "models": self.provider.describe(),
                "error": self.error}

    async def _beat(self) -> None:
        ttl = 3 * self.settings.heartbeat_ms / 1000
        await self.queue.heartbeat(self.id, self.info(), ttl)
        if self._held:
            await self.queue.renew(list(self._held.values()), self.id)

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
        """Collect re-quantize requests for our models; the main loop applies them between batches."""
        while not self._done.is_set():
            try:
                last, messages = await self.queue.read_control(self._control_last, self.settings.block_ms)
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
            await self._retrying(lambda op=op, result=result: self.queue.set_operation(
                op["id"], {f"worker:{self.id}": result}, self.settings.result_ttl_s))
            await self._beat()


def diverged(slots: list[ImageSlot], non_finite: Iterable[int], precision: str) -> dict[str, str]:
    """Job id -> error for the jobs with an image holding NaN/inf (`Generation.non_finite`, indices into `slots`):
    clipped, it would be a black PNG."""
    errors: dict[str, str] = {}
    for i in non_finite:
        slot = slots[i]
        errors.setdefault(slot.job_id, f"generation failed: image {slot.k} (seed {slot.seed}) came out with "
                                       f"non-finite values (NaN/inf): the {precision} model diverged; "
                                       "no image is returned")
    return errors
