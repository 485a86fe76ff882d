"""JobStore: the job records, their event streams and images; the API's side of the queue.

Submitting appends the job to its work stream (WorkStream hands it to a worker); position and depth look at the
not-yet-delivered entries of that stream. Every state change also records a job event (service/events.py) in
the job's event stream and, when the job's webhook subscribed to it, a task in the webhook outbox, in the same
atomic step, so a reader never sees a state without its event.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

from service import events
from service.events import Emission, JobEvent
from service.jobs import ACTIVE, JobRecord
from service.priority import class_stream


class JobStore(ABC):
    """Both backends pass the same contract tests (tests/test_job_store.py)."""

    @abstractmethod
    async def submit(self, job: JobRecord, idempotency_key: str | None, max_depth: int,
                     ttl_s: int) -> tuple[JobRecord, bool]:
        """Store the job and append it to its stream; returns (record, created).

        With a key seen before, returns that key's job and created=False (IdempotencyConflict when the request
        fingerprint differs). Raises QueueFull when `max_depth` jobs already wait in the stream.
        """

    @abstractmethod
    async def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    async def position(self, job: JobRecord) -> int | None:
        """Jobs ahead of a queued job in its stream (0 = next): every waiting job of a higher priority, then the
        older ones of its own; None once it is no longer queued."""

    @abstractmethod
    async def depth(self, stream: str) -> int:
        """Jobs waiting (not yet delivered to any worker) in a stream, all priorities."""

    @abstractmethod
    async def fetch_image(self, job_id: str, k: int) -> bytes | None: ...

    async def cancel(self, job_id: str, ttl_s: int) -> JobRecord | None:
        """queued/running -> cancelled (a queued job also leaves its stream); None if the job is unknown.

        A running job stops at its worker's next denoising step, which polls the status.
        """
        job = await self.transition(job_id, "cancelled", ACTIVE, ttl_s, emit=events.cancelled(job_id),
                                    finished_at=time.time())
        if job is not None:
            if job.msg_id is not None:
                await self._drop_queued(class_stream(job.stream, job.priority), job.msg_id)
            return job
        return await self.get(job_id)

    @abstractmethod
    async def _drop_queued(self, stream: str, msg_id: str) -> None:
        """Remove a not-yet-delivered entry of a class stream so it no longer counts in depth and positions."""

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Wait on the job's event stream until it is terminal or the timeout passes; returns the last record.

        No polling: each read blocks until the next event (a terminal transition records its event atomically, so
        one that lands between `get` and the read is still seen).
        """
        deadline = time.monotonic() + timeout_s
        after: str | None = None
        job = await self.get(job_id)
        while job is not None and not job.terminal:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return await self.get(job_id)
            got = await self.read_events(job_id, after, min(remaining_ms, events.BLOCK_SLICE_MS))
            if got:
                after = got[-1].id
            if any(e.terminal for e in got):
                job = await self.get(job_id)
        return job

    @abstractmethod
    async def read_events(self, job_id: str, after: str | None, block_ms: int) -> list[JobEvent]:
        """The job's events after id `after` (None: from the first kept one), waiting up to `block_ms` (0: don't
        wait) for one to arrive. Older events beyond the stream's MAXLEN are gone."""

    # -- written by the worker and the webhook dispatcher ----------------------------------------------------------
    @abstractmethod
    async def transition(self, job_id: str, to: str, from_states: Iterable[str], ttl_s: int,
                         emit: Emission | None = None, **fields: object) -> JobRecord | None:
        """Atomically set status=`to` (and fields) iff the current status is in `from_states`, and record the
        event `emit` (default: one of type `to`) with its webhook task, in the same step.

        Returns the updated record, or None when the job is unknown or in another state (e.g. cancelled).
        """

    @abstractmethod
    async def set_progress(self, progress: dict[str, tuple[int, int]]) -> dict[str, str | None]:
        """Record {job_id: (step, total)} for running jobs (with a `running` event each); returns their current
        statuses (None = gone)."""

    @abstractmethod
    async def store_images(self, job_id: str, pngs: list[bytes], ttl_s: int) -> None: ...

    @abstractmethod
    async def record_webhook_attempt(self, job_id: str, attempt: dict, keep: int) -> None:
        """Append to the job's `webhook_attempts`, keeping the last `keep`; the job's TTL is left as it is."""
