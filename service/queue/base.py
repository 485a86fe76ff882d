"""The JobQueue contract shared by the in-memory (embedded) and Redis Streams backends.

Producer side (API): submit, get, position, depth, cancel, images. Worker side: read (a consumer group),
reclaim/renew (leases), transition (atomic status changes), progress, store images, ack.
Plus the worker registry (heartbeats) and a broadcast control channel (re-quantize).
Every state change also records a job event (service/events.py) in the job's event stream, and, when the job's
webhook subscribed to it, a task in the webhook outbox that the workers' dispatchers consume (service/dispatcher.py).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from service import events
from service.events import Emission, JobEvent
from service.jobs import ACTIVE, JobRecord
from service.priority import class_stream


class QueueUnavailable(RuntimeError):
    """The backend cannot be reached (Redis down): the API answers 503, workers retry."""


class QueueFull(RuntimeError):
    def __init__(self, stream: str, depth: int) -> None:
        super().__init__(f"queue {stream} is full ({depth} jobs waiting)")
        self.stream, self.depth = stream, depth


class IdempotencyConflict(ValueError):
    """The idempotency key was used before for a different request."""


@dataclass(frozen=True)
class WebhookTask:
    """One webhook to deliver: `hook` of job `job_id`, for event `event_id`; pending until acked or reclaimed."""

    msg_id: str
    job_id: str
    hook: str
    event_id: str


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to one consumer; it stays pending until acked (or reclaimed by another)."""

    stream: str
    msg_id: str
    job_id: str


class JobQueue(ABC):
    """Both backends pass the same contract tests (tests/test_service_queue.py)."""

    # -- producer side -------------------------------------------------------------------------------------------
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

    # -- worker side ---------------------------------------------------------------------------------------------
    @abstractmethod
    async def ensure_streams(self, streams: Iterable[str]) -> None:
        """Create the streams and their consumer group if missing (idempotent)."""

    @abstractmethod
    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` never-delivered entries across `streams`, waiting up to `block_ms` for the first.

        Higher priorities first, with aging (service.priority): after `aging_batches` consecutive reads by this
        consumer that passed over waiting lower-priority entries, the next read starts with the lower class whose
        head waited longest. Deliveries name the class stream they came from (ack and renew take it).
        """

    @abstractmethod
    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over entries pending longer than `min_idle_ms` (their worker stopped renewing its lease), in every
        priority class of `stream`, higher classes first."""

    @abstractmethod
    async def renew(self, deliveries: Iterable[Delivery], consumer: str) -> None:
        """Reset the idle time of entries this consumer holds: the heartbeat-renewed lease."""

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Done with an entry: it leaves the pending list and the stream. Only after results are stored."""

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

    # -- webhook outbox (consumed by every worker's dispatcher, like a job stream) ------------------------------
    @abstractmethod
    async def read_webhooks(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[WebhookTask]:
        """Up to `count` tasks: first ones pending longer than `min_idle_ms` (their dispatcher died), then new
        ones, waiting up to `block_ms` for those."""

    @abstractmethod
    async def renew_webhooks(self, tasks: Iterable[WebhookTask], consumer: str) -> None:
        """Reset the idle time of tasks this consumer is still delivering (retrying with backoff)."""

    @abstractmethod
    async def ack_webhook(self, task: WebhookTask) -> None:
        """Done (delivered, or attempts exhausted): the task leaves the outbox."""

    @abstractmethod
    async def record_webhook_attempt(self, job_id: str, attempt: dict, keep: int) -> None:
        """Append to the job's `webhook_attempts`, keeping the last `keep`; the job's TTL is left as it is."""

    # -- workers registry and control channel --------------------------------------------------------------------
    @abstractmethod
    async def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        """Publish this worker's state; it disappears `ttl_s` after the last beat."""

    @abstractmethod
    async def workers(self) -> list[dict]: ...

    @abstractmethod
    async def remove_worker(self, worker_id: str) -> None: ...

    @abstractmethod
    async def publish_control(self, message: dict) -> str:
        """Broadcast to every worker (each sees every message published after it started listening)."""

    @abstractmethod
    async def read_control(self, last_id: str | None, block_ms: int) -> tuple[str, list[dict]]:
        """Messages after `last_id` (None = only future ones); returns the new last id and the messages."""

    @abstractmethod
    async def set_operation(self, op_id: str, fields: dict, ttl_s: int) -> None: ...

    @abstractmethod
    async def get_operation(self, op_id: str) -> dict | None: ...

    @abstractmethod
    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take a named lock (e.g. "only one worker calibrates"); it expires by itself if the owner dies."""

    @abstractmethod
    async def release_lock(self, name: str, owner: str) -> None:
        """Release it if `owner` still holds it."""

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers (readiness); never raises."""

    async def close(self) -> None:
        return None
