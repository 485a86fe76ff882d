"""In-memory JobQueue for the embedded default: same semantics as Redis Streams, in one event loop, no persistence."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from service import events
from service.events import Emission, JobEvent
from service.jobs import JobRecord
from service.priority import (
    DEFAULT_AGING_BATCHES,
    AgingCounter,
    Head,
    class_stream,
    class_streams,
    higher_classes,
    parse_id,
    passed_over,
    read_order,
)
from service.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, WebhookTask
from service.webhooks import OUTBOX_MAXLEN


@dataclass
class _Pending:
    job_id: str
    consumer: str
    since: float  # monotonic time of the last delivery or renewal


class MemoryQueue(JobQueue):
    """Every method runs on the event loop that owns the queue; none awaits mid-update, so each is atomic."""

    def __init__(self, events_maxlen: int = 500, aging_batches: int = DEFAULT_AGING_BATCHES) -> None:
        self.events_maxlen = events_maxlen
        self._aging = AgingCounter(aging_batches)
        self._job_events: dict[str, deque[JobEvent]] = {}  # expire with their job (see get)
        self._outbox: OrderedDict[str, WebhookTask] = OrderedDict()
        self._outbox_pending: dict[str, _Pending] = {}
        self._outbox_tasks: dict[str, WebhookTask] = {}  # pending ones, by id
        self._jobs: dict[str, tuple[JobRecord, float]] = {}
        self._images: dict[str, tuple[list[bytes], float]] = {}
        self._idem: dict[str, tuple[str, float]] = {}
        self._streams: dict[str, OrderedDict[str, str]] = {}
        self._pending: dict[str, dict[str, _Pending]] = {}
        self._ids = itertools.count(1)
        self._workers: dict[str, tuple[dict, float]] = {}
        self._control: list[tuple[str, dict]] = []
        self._ops: dict[str, tuple[dict, float]] = {}
        self._events: dict[int, asyncio.Event] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _event(self) -> asyncio.Event:
        """One wake-up event per loop (tests may use several loops over a process lifetime)."""
        loop = asyncio.get_running_loop()
        return self._events.setdefault(id(loop), asyncio.Event())

    def _notify(self) -> None:
        for event in self._events.values():
            event.set()

    async def _wait(self, deadline: float) -> None:
        event = self._event()
        event.clear()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def _next_id(self) -> str:
        return f"{next(self._ids)}-0"

    def _emit(self, job: JobRecord, emit: Emission, position: int | None = None) -> None:
        """Record the event and, when the job's webhook subscribed to its hook, queue the webhook task."""
        data = json.loads(emit.encoded())
        if position is not None:
            data["queue_position"] = position
        event = JobEvent(self._next_id(), data)
        self._job_events.setdefault(job.id, deque(maxlen=self.events_maxlen)).append(event)
        if emit.hook is not None and job.webhook and emit.hook in job.webhook_events:
            msg_id = self._next_id()
            self._outbox[msg_id] = WebhookTask(msg_id, job.id, emit.hook, event.id)
            while len(self._outbox) > OUTBOX_MAXLEN:
                self._outbox.popitem(last=False)
        self._notify()

    def _heads(self, classes: list[tuple[str, int]]) -> dict[str, Head | None]:
        """The oldest waiting entry of each class stream (entries leave the dict when delivered)."""
        return {name: parse_id(next(iter(q))) if (q := self._streams.get(name)) else None for name, _ in classes}

    @staticmethod
    def _live(entry: tuple[object, float] | None) -> bool:
        return entry is not None and entry[1] > time.time()

    # -- producer side ---------------------------------------------------------------------------------------------
    async def submit(self, job: JobRecord, idempotency_key: str | None, max_depth: int,
                     ttl_s: int) -> tuple[JobRecord, bool]:
        if idempotency_key is not None and self._live(self._idem.get(idempotency_key)):
            existing = await self.get(self._idem[idempotency_key][0])
            if existing is not None:
                if existing.fingerprint != job.fingerprint:
                    raise IdempotencyConflict("Idempotency-Key was already used for a different request")
                return existing, False
        depth = await self.depth(job.stream)
        if depth >= max_depth:
            raise QueueFull(job.stream, depth)
        msg_id = self._next_id()
        job = job.model_copy(update={"msg_id": msg_id})
        expires = time.time() + ttl_s
        self._jobs[job.id] = (job, expires)
        if idempotency_key is not None:
            self._idem[idempotency_key] = (job.id, expires)
        self._streams.setdefault(class_stream(job.stream, job.priority), OrderedDict())[msg_id] = job.id
        # The position at submission counts the waiting jobs of higher priorities, not the whole depth.
        self._emit(job, events.queued(job.id, job.priority), position=self._position(job))
        return job, True

    async def get(self, job_id: str) -> JobRecord | None:
        entry = self._jobs.get(job_id)
        if not self._live(entry):
            self._jobs.pop(job_id, None)
            self._images.pop(job_id, None)
            self._job_events.pop(job_id, None)
            return None
        return entry[0]

    async def position(self, job: JobRecord) -> int | None:
        return self._position(job)

    def _position(self, job: JobRecord) -> int | None:
        queue = self._streams.get(class_stream(job.stream, job.priority), OrderedDict())
        if job.msg_id not in queue:
            return None
        ahead = sum(len(self._streams.get(name, ())) for name in higher_classes(job.stream, job.priority))
        for index, msg_id in enumerate(queue):
            if msg_id == job.msg_id:
                return ahead + index
        return None

    async def depth(self, stream: str) -> int:
        return sum(len(self._streams.get(name, ())) for name, _ in class_streams([stream]))

    async def fetch_image(self, job_id: str, k: int) -> bytes | None:
        entry = self._images.get(job_id)
        if not self._live(entry) or not 0 <= k < len(entry[0]):
            return None
        return entry[0][k]

    async def _drop_queued(self, stream: str, msg_id: str) -> None:
        self._streams.get(stream, OrderedDict()).pop(msg_id, None)

    # -- worker side -----------------------------------------------------------------------------------------------
    async def ensure_streams(self, streams: Iterable[str]) -> None:
        for name, _ in class_streams(streams):
            self._streams.setdefault(name, OrderedDict())
            self._pending.setdefault(name, {})

    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        deadline = time.monotonic() + block_ms / 1000
        classes = class_streams(streams)
        while True:
            out: list[Delivery] = []
            aging = self._aging.due(consumer)
            for name in read_order(classes, self._heads(classes), aging):
                queue = self._streams.setdefault(name, OrderedDict())
                while queue and len(out) < count:
                    msg_id, job_id = queue.popitem(last=False)
                    self._pending.setdefault(name, {})[msg_id] = _Pending(job_id, consumer, time.monotonic())
                    out.append(Delivery(name, msg_id, job_id))
            if out:
                passed = passed_over(classes, {d.stream for d in out}, self._heads(classes))
                self._aging.record(consumer, aging, passed)
                return out
            if time.monotonic() >= deadline:
                return out
            await self._wait(deadline)

    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        now = time.monotonic()
        out = []
        for name, _ in class_streams([stream]):
            for msg_id, entry in self._pending.get(name, {}).items():
                if len(out) >= count:
                    return out
                if (now - entry.since) * 1000 >= min_idle_ms:
                    entry.consumer, entry.since = consumer, now
                    out.append(Delivery(name, msg_id, entry.job_id))
        return out

    async def renew(self, deliveries: Iterable[Delivery], consumer: str) -> None:
        now = time.monotonic()
        for d in deliveries:
            entry = self._pending.get(d.stream, {}).get(d.msg_id)
            if entry is not None and entry.consumer == consumer:
                entry.since = now

    async def ack(self, delivery: Delivery) -> None:
        self._pending.get(delivery.stream, {}).pop(delivery.msg_id, None)

    async def transition(self, job_id: str, to: str, from_states: Iterable[str], ttl_s: int,
                         emit: Emission | None = None, **fields: object) -> JobRecord | None:
        job = await self.get(job_id)
        if job is None or job.status not in tuple(from_states):
            return None
        job = job.model_copy(update={**fields, "status": to})
        self._jobs[job_id] = (job, time.time() + ttl_s)
        self._emit(job, emit or events.state_change(job_id, to))
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
                self._jobs[job_id] = (job, self._jobs[job_id][1])
                self._emit(job, events.progress(job_id, step, total))
            out[job_id] = job.status
        return out

    async def store_images(self, job_id: str, pngs: list[bytes], ttl_s: int) -> None:
        self._images[job_id] = (list(pngs), time.time() + ttl_s)

    async def read_events(self, job_id: str, after: str | None, block_ms: int) -> list[JobEvent]:
        deadline = time.monotonic() + block_ms / 1000
        after_key = events.id_key(after) if after else (-1, -1)
        while True:
            await self.get(job_id)  # drops the events of an expired job
            out = [e for e in self._job_events.get(job_id, ()) if events.id_key(e.id) > after_key]
            if out or time.monotonic() >= deadline:
                return out[:100]
            await self._wait(deadline)

    # -- webhook outbox --------------------------------------------------------------------------------------------
    async def read_webhooks(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[WebhookTask]:
        deadline = time.monotonic() + block_ms / 1000
        now = time.monotonic()
        out: list[WebhookTask] = []
        for msg_id, entry in self._outbox_pending.items():
            if len(out) < count and (now - entry.since) * 1000 >= min_idle_ms:
                entry.consumer, entry.since = consumer, now
                out.append(self._outbox_tasks[msg_id])
        while True:
            while self._outbox and len(out) < count:
                msg_id, task = self._outbox.popitem(last=False)
                self._outbox_pending[msg_id] = _Pending(task.job_id, consumer, time.monotonic())
                self._outbox_tasks[msg_id] = task
                out.append(task)
            if out or time.monotonic() >= deadline:
                return out
            await self._wait(deadline)

    async def renew_webhooks(self, tasks: Iterable[WebhookTask], consumer: str) -> None:
        now = time.monotonic()
        for task in tasks:
            entry = self._outbox_pending.get(task.msg_id)
            if entry is not None and entry.consumer == consumer:
                entry.since = now

    async def ack_webhook(self, task: WebhookTask) -> None:
        self._outbox_pending.pop(task.msg_id, None)
        self._outbox_tasks.pop(task.msg_id, None)

    async def record_webhook_attempt(self, job_id: str, attempt: dict, keep: int) -> None:
        job = await self.get(job_id)
        if job is not None:
            attempts = [*job.webhook_attempts, dict(attempt)][-keep:]
            self._jobs[job_id] = (job.model_copy(update={"webhook_attempts": attempts}), self._jobs[job_id][1])

    # -- registry and control --------------------------------------------------------------------------------------
    async def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        self._workers[worker_id] = (dict(info), time.time() + ttl_s)

    async def workers(self) -> list[dict]:
        return [info for info, expires in self._workers.values() if expires > time.time()]

    async def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def publish_control(self, message: dict) -> str:
        msg_id = self._next_id()
        self._control.append((msg_id, dict(message)))
        self._notify()
        return msg_id

    async def read_control(self, last_id: str | None, block_ms: int) -> tuple[str, list[dict]]:
        if last_id is None:
            return (self._control[-1][0] if self._control else "0-0"), []
        deadline = time.monotonic() + block_ms / 1000
        while True:
            after = int(last_id.split("-")[0])
            new = [(i, m) for i, m in self._control if int(i.split("-")[0]) > after]
            if new or time.monotonic() >= deadline:
                return (new[-1][0] if new else last_id), [m for _, m in new]
            await self._wait(deadline)

    async def set_operation(self, op_id: str, fields: dict, ttl_s: int) -> None:
        current = self._ops[op_id][0] if self._live(self._ops.get(op_id)) else {}
        self._ops[op_id] = ({**current, **fields}, time.time() + ttl_s)

    async def get_operation(self, op_id: str) -> dict | None:
        entry = self._ops.get(op_id)
        return dict(entry[0]) if self._live(entry) else None

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        holder = self._locks.get(name)
        if self._live(holder) and holder[0] != owner:
            return False
        self._locks[name] = (owner, time.time() + ttl_ms / 1000)
        return True

    async def release_lock(self, name: str, owner: str) -> None:
        if self._locks.get(name, ("",))[0] == owner:
            del self._locks[name]

    async def ping(self) -> bool:
        return True
