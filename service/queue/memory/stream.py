"""The in-memory WorkStream: the same delivery, lease and priority rules as the Redis consumer groups."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

from service.priority import DEFAULT_AGING_BATCHES, AgingCounter, Head, class_streams, parse_id, passed_over, read_order
from service.queue.base import Delivery, WebhookTask
from service.queue.memory.state import MemoryState, Pending
from service.queue.stream import WorkStream


class MemoryWorkStream(WorkStream):
    def __init__(self, state: MemoryState, aging_batches: int = DEFAULT_AGING_BATCHES) -> None:
        self.s = state
        self._aging = AgingCounter(aging_batches)
        self._outbox_pending: dict[str, Pending] = {}
        self._outbox_tasks: dict[str, WebhookTask] = {}  # the pending ones, by id

    def _heads(self, classes: list[tuple[str, int]]) -> dict[str, Head | None]:
        """The oldest waiting entry of each class stream (entries leave the dict when delivered)."""
        return {name: parse_id(next(iter(q))) if (q := self.s.streams.get(name)) else None for name, _ in classes}

    async def ensure_streams(self, streams: Iterable[str]) -> None:
        for name, _ in class_streams(streams):
            self.s.streams.setdefault(name, OrderedDict())
            self.s.pending.setdefault(name, {})

    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        deadline = time.monotonic() + block_ms / 1000
        classes = class_streams(streams)
        while True:
            out: list[Delivery] = []
            aging = self._aging.due(consumer)
            for name in read_order(classes, self._heads(classes), aging):
                queue = self.s.streams.setdefault(name, OrderedDict())
                while queue and len(out) < count:
                    msg_id, job_id = queue.popitem(last=False)
                    self.s.pending.setdefault(name, {})[msg_id] = Pending(job_id, consumer, time.monotonic())
                    out.append(Delivery(name, msg_id, job_id))
            if out:
                passed = passed_over(classes, {d.stream for d in out}, self._heads(classes))
                self._aging.record(consumer, aging, passed)
                return out
            if time.monotonic() >= deadline:
                return out
            await self.s.wait(deadline)

    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        now = time.monotonic()
        out = []
        for name, _ in class_streams([stream]):
            for msg_id, entry in self.s.pending.get(name, {}).items():
                if len(out) >= count:
                    return out
                if (now - entry.since) * 1000 >= min_idle_ms:
                    entry.consumer, entry.since = consumer, now
                    out.append(Delivery(name, msg_id, entry.job_id))
        return out

    async def renew(self, deliveries: Iterable[Delivery], consumer: str) -> None:
        now = time.monotonic()
        for d in deliveries:
            entry = self.s.pending.get(d.stream, {}).get(d.msg_id)
            if entry is not None and entry.consumer == consumer:
                entry.since = now

    async def ack(self, delivery: Delivery) -> None:
        self.s.pending.get(delivery.stream, {}).pop(delivery.msg_id, None)

    # -- webhook outbox --------------------------------------------------------------------------------------------
    async def read_webhooks(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[WebhookTask]:
        deadline = time.monotonic() + block_ms / 1000
        now = time.monotonic()
        out: list[WebhookTask] = []
        for msg_id, entry in self._outbox_pending.items():
            if len(out) < count and (now - entry.since) * 1000 >= min_idle_ms:
                entry.consumer, entry.since = consumer, now
                out.append(self._outbox_tasks[msg_id])
        outbox = self.s.outbox
        while True:
            while outbox and len(out) < count:
                msg_id, task = outbox.popitem(last=False)
                self._outbox_pending[msg_id] = Pending(task.job_id, consumer, time.monotonic())
                self._outbox_tasks[msg_id] = task
                out.append(task)
            if out or time.monotonic() >= deadline:
                return out
            await self.s.wait(deadline)

    async def renew_webhooks(self, tasks: Iterable[WebhookTask], consumer: str) -> None:
        now = time.monotonic()
        for task in tasks:
            entry = self._outbox_pending.get(task.msg_id)
            if entry is not None and entry.consumer == consumer:
                entry.since = now

    async def ack_webhook(self, task: WebhookTask) -> None:
        self._outbox_pending.pop(task.msg_id, None)
        self._outbox_tasks.pop(task.msg_id, None)
