"""Job queue backends behind one contract: in-memory (embedded default) and Redis Streams."""

from __future__ import annotations

from service.priority import DEFAULT_AGING_BATCHES
from service.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, QueueUnavailable
from service.queue.memory import MemoryQueue


def make_queue(redis_url: str | None, prefix: str = "ptq4dm",
               aging_batches: int = DEFAULT_AGING_BATCHES) -> JobQueue:
    """No URL -> the in-memory queue (one process); otherwise Redis (imported only when used)."""
    if redis_url is None:
        return MemoryQueue(aging_batches)
    from service.queue.redis import RedisQueue

    return RedisQueue(redis_url, prefix, aging_batches)


__all__ = ["Delivery", "IdempotencyConflict", "JobQueue", "MemoryQueue", "QueueFull", "QueueUnavailable",
           "make_queue"]
