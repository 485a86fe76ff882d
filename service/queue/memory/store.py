"""The in-memory JobStore (embedded mode): records with a TTL, checked on read."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

from service import events
from service.events import Emission, JobEvent
from service.jobs import JobRecord
from service.priority import class_stream, class_streams, higher_classes
from service.queue.base import IdempotencyConflict, QueueFull
from service.queue.memory.state import MemoryState, live
from service.queue.store import JobStore


class MemoryJobStore(JobStore):
    def __init__(self, state: MemoryState) -> None:
        self.s = state

    async def submit(self, job: JobRecord, idempotency_key: str | None, max_depth: int,
                     ttl_s: int) -> tuple[JobRecord, bool]:
        s = self.s
        if idempotency_key is not None and live(s.idem.get(idempotency_key)):
            existing = await self.get(s.idem[idempotency_key][0])
            if existing is not None:
                if existing.fingerprint != job.fingerprint:
                    raise IdempotencyConflict("Idempotency-Key was already used for a different request")
                return existing, False
        depth = await self.depth(job.stream)
        if depth >= max_depth:
            raise QueueFull(job.stream, depth)
        msg_id = s.next_id()
        job = job.model_copy(update={"msg_id": msg_id})
        expires = time.time() + ttl_s
        s.jobs[job.id] = (job, expires)
        if idempotency_key is not None:
            s.idem[idempotency_key] = (job.id, expires)
        s.streams.setdefault(class_stream(job.stream, job.priority), OrderedDict())[msg_id] = job.id
        # The position at submission counts the waiting jobs of higher priorities, not the whole depth.
        s.emit(job, events.queued(job.id, job.priority), position=self._position(job))
        return job, True

    async def get(self, job_id: str) -> JobRecord | None:
        s = self.s
        entry = s.jobs.get(job_id)
        if not live(entry):
            s.jobs.pop(job_id, None)
            s.images.pop(job_id, None)
            s.job_events.pop(job_id, None)
            return None
        return entry[0]

    async def position(self, job: JobRecord) -> int | None:
        return self._position(job)

    def _position(self, job: JobRecord) -> int | None:
        streams = self.s.streams
        queue = streams.get(class_stream(job.stream, job.priority), OrderedDict())
        if job.msg_id not in queue:
            return None
        ahead = sum(len(streams.get(name, ())) for name in higher_classes(job.stream, job.priority))
        for index, msg_id in enumerate(queue):
            if msg_id == job.msg_id:
                return ahead + index
        return None

    async def depth(self, stream: str) -> int:
        return sum(len(self.s.streams.get(name, ())) for name, _ in class_streams([stream]))

    async def fetch_image(self, job_id: str, k: int) -> bytes | None:
        entry = self.s.images.get(job_id)
        if not live(entry) or not 0 <= k < len(entry[0]):
            return None
        return entry[0][k]

    async def _drop_queued(self, stream: str, msg_id: str) -> None:
        self.s.streams.get(stream, OrderedDict()).pop(msg_id, None)

    async def read_events(self, job_id: str, after: str | None, block_ms: int) -> list[JobEvent]:
        deadline = time.monotonic() + block_ms / 1000
        after_key = events.id_key(after) if after else (-1, -1)
        while True:
            await self.get(job_id)  # drops the events of an expired job
            out = [e for e in self.s.job_events.get(job_id, ()) if events.id_key(e.id) > after_key]
            if out or time.monotonic() >= deadline:
                return out[:100]
            await self.s.wait(deadline)

    async def transition(self, job_id: str, to: str, from_states: Iterable[str], ttl_s: int,
                         emit: Emission | None = None, **fields: object) -> JobRecord | None:
        job = await self.get(job_id)
        if job is None or job.status not in tuple(from_states):
            return None
        job = job.model_copy(update={**fields, "status": to})
        self.s.jobs[job_id] = (job, time.time() + ttl_s)
        self.s.emit(job, emit or events.state_change(job_id, to))
        return job

    async def set_progress(self, progress: dict[str, tuple[int, int]]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for job_id, (step, total) in progress.items():
            job = await self.get(job_id)
            if job is None:
                out[job_id] = None
                continue
            if job.status == "running":
                job = job.model_copy(update={"progress_step": step, "progress_total": total})
                self.s.jobs[job_id] = (job, self.s.jobs[job_id][1])
                self.s.emit(job, events.progress(job_id, step, total))
            out[job_id] = job.status
        return out

    async def store_images(self, job_id: str, pngs: list[bytes], ttl_s: int) -> None:
        self.s.images[job_id] = (list(pngs), time.time() + ttl_s)

    async def record_webhook_attempt(self, job_id: str, attempt: dict, keep: int) -> None:
        job = await self.get(job_id)
        if job is not None:
            attempts = [*job.webhook_attempts, dict(attempt)][-keep:]
            self.s.jobs[job_id] = (job.model_copy(update={"webhook_attempts": attempts}), self.s.jobs[job_id][1])
