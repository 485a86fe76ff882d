"""The Redis backend: the three roles over one client (service/queue/redis/client.py has the key layout)."""

from __future__ import annotations

from service.priority import DEFAULT_AGING_BATCHES
from service.queue.base import QueueBackend
from service.queue.redis.bus import RedisControlBus
from service.queue.redis.client import connect
from service.queue.redis.store import RedisJobStore
from service.queue.redis.stream import RedisWorkStream


class RedisBackend(QueueBackend):
    def __init__(self, url: str, prefix: str = "ptq4dm", events_maxlen: int = 500,
                 aging_batches: int = DEFAULT_AGING_BATCHES) -> None:
        self.r = connect(url)
        self.store = RedisJobStore(self.r, prefix, events_maxlen)
        self.stream = RedisWorkStream(self.r, prefix, aging_batches)
        self.bus = RedisControlBus(self.r, prefix)

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.r.aclose()


__all__ = ["RedisBackend", "RedisControlBus", "RedisJobStore", "RedisWorkStream"]
