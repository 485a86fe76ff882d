"""The job runner: a batch of deliveries -> start the jobs -> group compatible ones -> generate passes -> store PNGs
-> ack. The worker's batch loop (service/worker.py) feeds it; it knows nothing of loops, heartbeats or control.

Everything that touches the model goes through `quantizer.engine.Engine` (held by the provider's ServedModel).
At-least-once: an entry is acked only after its job reached a final state (results stored first); the entries in
hand (`held`) have their lease renewed by the worker's heartbeat. A job delivered more than `max_deliveries` times
is failed (dead-letter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import numpy as np

from quantizer.diffusion.images import png_bytes
from quantizer.engine import Generation
from service import events
from service.batching import ImageSlot, group_compatible, pack_passes, passes_per_job
from service.jobs import ACTIVE, JobRecord
from service.metrics import Metrics
from service.provider import ModelProvider, ServedModel
from service.queue.base import Delivery, QueueUnavailable
from service.queue.store import JobStore
from service.queue.stream import WorkStream
from service.retrying import Retrying
from service.settings import ServiceSettings
from service.threads import in_thread

log = logging.getLogger(__name__)


class _AllCancelled(Exception):
    """Raised from the step callback: every job in the pass was cancelled, stop between denoising steps."""


class JobRunner:
    def __init__(self, settings: ServiceSettings, store: JobStore, stream: WorkStream, provider: ModelProvider,
                 metrics: Metrics, consumer: str, retrying: Retrying) -> None:
        self.settings = settings
        self.store = store
        self.stream = stream
        self.provider = provider
        self.metrics = metrics
        self.id = consumer
        self.retrying = retrying
        self.held: dict[str, Delivery] = {}  # the entries in hand: the heartbeat renews their leases
        self.jobs_done = 0

    async def process(self, deliveries: list[Delivery]) -> None:
        """Run one batch of deliveries to their final states; each is acked exactly when its job is settled."""
        self.held.update({d.msg_id: d for d in deliveries})
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
                self.held.pop(d.msg_id, None)

    async def _begin(self, d: Delivery) -> JobRecord | None:
        """queued/running -> running (counting the delivery), or settle the entry right away."""
        s, store = self.settings, self.store
        job = await self.store.get(d.job_id)
        if job is None or job.terminal:  # expired, cancelled, or finished by a previous holder
            await self.stream.ack(d)
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
        running = await store.transition(job.id, "running", ACTIVE, s.result_ttl_s,
                                         emit=events.started(job.id, job.steps), started_at=now, worker=self.id,
                                         attempts=attempts, progress_step=0, progress_total=job.steps)
        if running is None:
            await self.stream.ack(d)
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
            await self.stream.ack(deliveries[job_id])

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
                statuses = asyncio.run_coroutine_threadsafe(self.store.set_progress(progress), loop).result(30)
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
        await self.retrying(lambda: self.store.store_images(job.id, pngs, s.result_ttl_s))
        total = job.steps * n_passes
        # The labels as run: the record then says which class each image is, also where they were drawn.
        ran = {"class_labels": [labels[k] for k in range(job.n)]} if len(labels) == job.n else {}
        done = await self.retrying(lambda: self.store.transition(
            job.id, "succeeded", ("running",), s.result_ttl_s, emit=events.succeeded(job.id, job.n),
            finished_at=time.time(), progress_step=total,
            progress_total=total, model_version=served.version, calibration_hash=served.calibration_hash,
            compute_s=round(compute_s, 6), **ran))
        await self.retrying(lambda: self.stream.ack(d))
        if done is not None:
            self.jobs_done += 1
            self.metrics.images.inc(job.n)
            self.metrics.jobs_finished.labels("succeeded").inc()
            self.metrics.run_seconds.observe(max(0.0, done.finished_at - (done.started_at or done.finished_at)))
        else:
            self.metrics.jobs_finished.labels("cancelled").inc()

    async def _fail(self, d: Delivery, job: JobRecord, error: str, reason: str, **fields: object) -> None:
        await self.retrying(lambda: self.store.transition(
            job.id, "failed", ACTIVE, self.settings.result_ttl_s, emit=events.failed(job.id, error), error=error,
            finished_at=time.time(), **fields))
        await self.retrying(lambda: self.stream.ack(d))
        self.metrics.failures.labels(reason).inc()
        self.metrics.jobs_finished.labels("failed").inc()


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
