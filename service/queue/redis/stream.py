"""The Redis WorkStream: a stream + consumer group per model+precision and priority class, and the webhook outbox.

A read is one script over the class streams in priority order (service.priority), so a batch never takes more
than `count` entries however many classes have work; a blocking read waits with a plain XREAD from each class's
last id, which delivers nothing and wakes on the first new entry.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.priority import DEFAULT_AGING_BATCHES, AgingCounter, Head, class_streams, parse_id, passed_over, read_order
from service.queue.base import Delivery, WebhookTask
from service.queue.redis import scripts
from service.queue.redis.client import GROUP, WEBHOOK_GROUP, RedisRole, unavailable
from service.queue.stream import WorkStream


class RedisWorkStream(RedisRole, WorkStream):
    def __init__(self, r: aioredis.Redis, prefix: str, aging_batches: int = DEFAULT_AGING_BATCHES) -> None:
        super().__init__(r, prefix)
        self._aging = AgingCounter(aging_batches)
        self._read = r.register_script(scripts.READ)

    @unavailable
    async def ensure_streams(self, streams: Iterable[str]) -> None:
        for name, _ in class_streams(streams):
            try:
                await self.r.xgroup_create(self._stream(name), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    @unavailable
    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        classes = class_streams(streams)
        if not classes:
            return []
        deadline = time.monotonic() + block_ms / 1000
        while True:
            aging = self._aging.due(consumer)
            order = [name for name, _ in classes]
            if aging:
                _, heads, _ = await self._read_classes(order, consumer, 0)
                order = read_order(classes, heads, aging=True)
            out, heads, tails = await self._read_classes(order, consumer, count)
            if out:
                self._aging.record(consumer, aging, passed_over(classes, {d.stream for d in out}, heads))
                return out
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return out
            # Delivers nothing: returns at the first entry added to any class after the read (or at the timeout).
            await self.r.xread({self._stream(name): tails[name] for name in order}, count=1, block=left_ms)

    async def _read_classes(self, order: list[str], consumer: str,
                            count: int) -> tuple[list[Delivery], dict[str, Head | None], dict[str, str]]:
        """One READ script: (deliveries, each class's oldest waiting id, each class's last id)."""
        entries, heads, tails = await self._read(keys=[self._stream(name) for name in order],
                                                 args=[GROUP, consumer, count])
        out = [Delivery(order[int(entries[i]) - 1], entries[i + 1].decode(), entries[i + 2].decode())
               for i in range(0, len(entries), 3)]
        return (out, {name: parse_id(h.decode()) if h else None for name, h in zip(order, heads, strict=True)},
                {name: t.decode() for name, t in zip(order, tails, strict=True)})

    @unavailable
    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        out: list[Delivery] = []
        for name, _ in class_streams([stream]):
            if len(out) >= count:
                break
            try:
                reply = await self.r.xautoclaim(self._stream(name), GROUP, consumer, min_idle_ms, "0-0",
                                                count=count - len(out))
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue
                raise
            out += [Delivery(name, msg_id.decode(), fields[b"job"].decode()) for msg_id, fields in reply[1] if fields]
        return out

    @unavailable
    async def renew(self, deliveries: Iterable[Delivery], consumer: str) -> None:
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.msg_id)
        for stream, ids in by_stream.items():
            # XCLAIM with min-idle 0 by the owner itself just resets the idle clock; JUSTID keeps the count.
            await self.r.xclaim(self._stream(stream), GROUP, consumer, 0, ids, justid=True)

    @unavailable
    async def ack(self, delivery: Delivery) -> None:
        pipe = self.r.pipeline(transaction=True)
        key = self._stream(delivery.stream)
        pipe.xack(key, GROUP, delivery.msg_id)
        pipe.xdel(key, delivery.msg_id)
        await pipe.execute()

    # -- webhook outbox --------------------------------------------------------------------------------------------
    @unavailable
    async def read_webhooks(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[WebhookTask]:
        key = self._k("webhooks")
        try:
            reply = await self.r.xautoclaim(key, WEBHOOK_GROUP, consumer, min_idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            with contextlib.suppress(ResponseError):  # BUSYGROUP: another dispatcher created it meanwhile
                await self.r.xgroup_create(key, WEBHOOK_GROUP, id="0", mkstream=True)
            reply = [b"0-0", []]
        out = [_webhook_task(msg_id, fields) for msg_id, fields in reply[1] if fields]
        if len(out) < count:
            fresh = await self.r.xreadgroup(WEBHOOK_GROUP, consumer, {key: ">"}, count=count - len(out),
                                            block=None if out or block_ms <= 0 else block_ms)
            out += [_webhook_task(msg_id, fields) for _, entries in fresh or [] for msg_id, fields in entries]
        return out

    @unavailable
    async def renew_webhooks(self, tasks: Iterable[WebhookTask], consumer: str) -> None:
        ids = [t.msg_id for t in tasks]
        if ids:
            await self.r.xclaim(self._k("webhooks"), WEBHOOK_GROUP, consumer, 0, ids, justid=True)

    @unavailable
    async def ack_webhook(self, task: WebhookTask) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self._k("webhooks"), WEBHOOK_GROUP, task.msg_id)
        pipe.xdel(self._k("webhooks"), task.msg_id)
        await pipe.execute()


def _webhook_task(msg_id: bytes, fields: dict[bytes, bytes]) -> WebhookTask:
    return WebhookTask(msg_id.decode(), fields[b"job"].decode(), fields[b"hook"].decode(), fields[b"event"].decode())
