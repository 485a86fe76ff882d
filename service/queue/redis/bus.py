"""The Redis ControlBus: heartbeat keys with a TTL, a broadcast stream read without a group, op hashes, locks."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from service.queue.bus import ControlBus
from service.queue.redis import scripts
from service.queue.redis.client import RedisRole, unavailable


class RedisControlBus(RedisRole, ControlBus):
    def __init__(self, r: aioredis.Redis, prefix: str) -> None:
        super().__init__(r, prefix)
        self._release = r.register_script(scripts.RELEASE)

    @unavailable
    async def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        await self.r.set(self._k("worker", worker_id), json.dumps(info), px=max(1, int(ttl_s * 1000)))

    @unavailable
    async def workers(self) -> list[dict]:
        keys = [k async for k in self.r.scan_iter(match=self._k("worker", "*"), count=100)]
        values = await self.r.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    @unavailable
    async def remove_worker(self, worker_id: str) -> None:
        await self.r.delete(self._k("worker", worker_id))

    @unavailable
    async def publish_control(self, message: dict) -> str:
        msg_id = await self.r.xadd(self._k("control"), {"m": json.dumps(message)}, maxlen=1000, approximate=True)
        return msg_id.decode()

    @unavailable
    async def read_control(self, last_id: str | None, block_ms: int) -> tuple[str, list[dict]]:
        key = self._k("control")
        if last_id is None:
            newest = await self.r.xrevrange(key, count=1)
            return (newest[0][0].decode() if newest else "0-0"), []
        reply = await self.r.xread({key: last_id}, count=100, block=block_ms if block_ms > 0 else None)
        messages = []
        for _, entries in reply or []:
            for msg_id, fields in entries:
                last_id = msg_id.decode()
                messages.append(json.loads(fields[b"m"]))
        return last_id, messages

    @unavailable
    async def set_operation(self, op_id: str, fields: dict, ttl_s: int) -> None:
        key = self._k("op", op_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
        pipe.expire(key, ttl_s)
        await pipe.execute()

    @unavailable
    async def get_operation(self, op_id: str) -> dict | None:
        raw = await self.r.hgetall(self._k("op", op_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()} or None

    @unavailable
    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        key = self._k("lock", name)
        if await self.r.set(key, owner, nx=True, px=ttl_ms):
            return True
        return (await self.r.get(key)) == owner.encode()

    @unavailable
    async def release_lock(self, name: str, owner: str) -> None:
        await self._release(keys=[self._k("lock", name)], args=[owner])
