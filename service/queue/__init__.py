"""The queue, split by role (a job store, a work stream, a control bus), on two backends: in-memory (embedded
default) and Redis Streams. service/queue/base.py says which process takes which role."""

from __future__ import annotations

from service.priority import DEFAULT_AGING_BATCHES
from service.queue.base import Delivery, IdempotencyConflict, QueueBackend, QueueFull, QueueUnavailable, WebhookTask
from service.queue.bus import ControlBus
from service.queue.memory import MemoryBackend
from service.queue.store import JobStore
from service.queue.stream import WorkStream


def make_backend(redis_url: str | None, prefix: str = "ptq4dm", events_maxlen: int = 500,
                 aging_batches: int = DEFAULT_AGING_BATCHES) -> QueueBackend:
    """No URL -> the in-memory backend (one process); otherwise Redis (imported only when used)."""
    if redis_url is None:
        return MemoryBackend(events_maxlen, aging_batches)
    from service.queue.redis import RedisBackend

    return RedisBackend(redis_url, prefix, events_maxlen, aging_batches)


__all__ = ["ControlBus", "Delivery", "IdempotencyConflict", "JobStore", "MemoryBackend", "QueueBackend", "QueueFull",
           "QueueUnavailable", "WebhookTask", "WorkStream", "make_backend"]
