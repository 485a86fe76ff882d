"""What the three queue roles share: their errors, the records they hand out, and the backend that bundles them.

A backend (in-memory for embedded mode, or Redis) implements three roles over one connection/state:
  - JobStore (service/queue/store.py): job records, their events, images; what the API reads and writes.
  - WorkStream (service/queue/stream.py): the leased job streams workers consume, and the webhook outbox.
  - ControlBus (service/queue/bus.py): the worker registry, the broadcast control channel, operations, locks.
Each process takes the roles it needs: the API routes the store (and the bus for admin), the worker all three,
the webhook dispatcher the stream's outbox and the store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.queue.bus import ControlBus
    from service.queue.store import JobStore
    from service.queue.stream import WorkStream


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


class QueueBackend(ABC):
    """The three roles of one backend, sharing its connection; each passes its own contract tests on both backends
    (tests/test_job_store.py, tests/test_work_stream.py, tests/test_control_bus.py)."""

    store: JobStore
    stream: WorkStream
    bus: ControlBus

    @abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers (readiness); never raises."""

    async def close(self) -> None:
        return None
