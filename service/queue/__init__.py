"""Job queue backends behind one contract: in-memory (embedded default) and Redis Streams."""

from __future__ import annotations

from service.priority import DEFAULT_AGING_BATCHES
from service.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, QueueUnavailable, WebhookTask
from service.queue.memory import MemoryQueue


def make_queue(redis_url: str | None, prefix: str = "ptq4dm", events_maxlen: int = 500,
               aging_batches: int = DEFAULT_AGING_BATCHES) -> JobQueue:
    """No URL -> the in-memory queue (one process); otherwise Redis (imported only when used)."""
    if redis_url is None:
        return MemoryQueue(events_maxlen, aging_batches)
    from service.queue.redis import RedisQueue

    return RedisQueue(redis_url, prefix, events_maxlen, aging_batches)


__all__ = ["Delivery", "IdempotencyConflict", "JobQueue", "MemoryQueue", "QueueFull", "QueueUnavailable",
           "WebhookTask", "make_queue"]
