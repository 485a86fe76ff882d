"""The in-memory backend's shared state: one event loop's dicts that the three roles read and write.

Every method of the roles runs on the event loop that owns the backend and none awaits mid-update, so each is
atomic, as a Redis script is. Blocking reads wait on a wake-up event that any change sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from service.events import Emission, JobEvent
from service.jobs import JobRecord
from service.queue.base import WebhookTask
from service.webhooks import OUTBOX_MAXLEN


@dataclass
class Pending:
    """A delivered, not yet acked entry: who holds it, and since when (monotonic; renewals move it)."""

    job_id: str
    consumer: str
    since: float


def live(entry: tuple[object, float] | None) -> bool:
    """Whether a (value, expires_at) entry has not expired."""
    return entry is not None and entry[1] > time.time()


@dataclass
class MemoryState:
    events_maxlen: int = 500
    jobs: dict[str, tuple[JobRecord, float]] = field(default_factory=dict)
    images: dict[str, tuple[list[bytes], float]] = field(default_factory=dict)
    idem: dict[str, tuple[str, float]] = field(default_factory=dict)
    job_events: dict[str, deque[JobEvent]] = field(default_factory=dict)  # expire with their job (JobStore.get)
    streams: dict[str, OrderedDict[str, str]] = field(default_factory=dict)  # class stream -> waiting msg -> job
    pending: dict[str, dict[str, Pending]] = field(default_factory=dict)  # class stream -> delivered msg -> holder
    outbox: OrderedDict[str, WebhookTask] = field(default_factory=OrderedDict)  # not yet delivered
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _wakeups: dict[int, asyncio.Event] = field(default_factory=dict)

    def next_id(self) -> str:
        return f"{next(self._ids)}-0"

    def notify(self) -> None:
        for event in self._wakeups.values():
            event.set()

    async def wait(self, deadline: float) -> None:
        """Until the next change or the (monotonic) deadline. One event per loop: tests use several loops."""
        event = self._wakeups.setdefault(id(asyncio.get_running_loop()), asyncio.Event())
        event.clear()
        remaining = deadline - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def emit(self, job: JobRecord, emit: Emission, position: int | None = None) -> None:
        """Record the event and, when the job's webhook subscribed to its hook, queue the webhook task."""
        data = json.loads(emit.encoded())
        if position is not None:
            data["queue_position"] = position
        event = JobEvent(self.next_id(), data)
        self.job_events.setdefault(job.id, deque(maxlen=self.events_maxlen)).append(event)
        if emit.hook is not None and job.webhook and emit.hook in job.webhook_events:
            msg_id = self.next_id()
            self.outbox[msg_id] = WebhookTask(msg_id, job.id, emit.hook, event.id)
            while len(self.outbox) > OUTBOX_MAXLEN:
                self.outbox.popitem(last=False)
        self.notify()
