"""Job queue backends behind one contract: in-memory (embedded default) and Redis Streams."""

from __future__ import annotations

from service.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, QueueUnavailable, WebhookTask
from service.queue.memory import MemoryQueue


def make_queue(redis_url: str | None, prefix: str = "ptq4dm", events_maxlen: int = 500) -> JobQueue:
    """No URL -> the in-memory queue (one process); otherwise Redis (imported only when used)."""
    if redis_url is None:
        return MemoryQueue(events_maxlen)
    from service.queue.redis import RedisQueue

    return RedisQueue(redis_url, prefix, events_maxlen)


__all__ = ["Delivery", "IdempotencyConflict", "JobQueue", "MemoryQueue", "QueueFull", "QueueUnavailable",
           "WebhookTask", "make_queue"]
