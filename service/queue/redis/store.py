"""The Redis JobStore: job hashes with a TTL; every change is one script that also appends the job's event."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service import events
from service.events import Emission, JobEvent
from service.jobs import JobRecord, encode_fields
from service.priority import class_stream, class_streams, higher_classes, parse_id
from service.queue.base import IdempotencyConflict, QueueFull
from service.queue.redis import scripts
from service.queue.redis.client import GROUP, RedisRole, record, unavailable
from service.queue.store import JobStore


class RedisJobStore(RedisRole, JobStore):
    def __init__(self, r: aioredis.Redis, prefix: str, events_maxlen: int = 500) -> None:
        super().__init__(r, prefix)
        self.events_maxlen = events_maxlen
        self._submit = r.register_script(scripts.SUBMIT)
        self._transition = r.register_script(scripts.TRANSITION)
        self._progress = r.register_script(scripts.PROGRESS)
        self._attempt = r.register_script(scripts.ATTEMPT)
        self._waiting = r.register_script(scripts.WAITING)

    @unavailable
    async def submit(self, job: JobRecord, idempotency_key: str | None, max_depth: int,
                     ttl_s: int) -> tuple[JobRecord, bool]:
        idem = self._k("idem", idempotency_key) if idempotency_key is not None else ""
        own = self._stream(class_stream(job.stream, job.priority))
        every = [self._stream(name) for name, _ in class_streams([job.stream])]
        n_higher = len(higher_classes(job.stream, job.priority))
        args: list[Any] = [job.id, ttl_s, max_depth, GROUP, self.events_maxlen,
                           events.queued(job.id, job.priority).encoded(), n_higher]
        for key, value in job.to_fields().items():
            args += [key, value]
        keys = [self._k("job", job.id), own, idem, self._k("events", job.id), self._k("webhooks"), *every]
        kind, value, *existing = await self._submit(keys=keys, args=args)
        kind, value = kind.decode(), value.decode()
        if kind == "full":
            raise QueueFull(job.stream, int(value))
        if kind == "existing":
            if existing[0]:
                found = record(existing[0])
                if found.fingerprint != job.fingerprint:
                    raise IdempotencyConflict("Idempotency-Key was already used for a different request")
                return found, False
            await self.r.delete(idem)  # the key outlived its job: start over with a fresh one
            return await self.submit(job, idempotency_key, max_depth, ttl_s)
        return job.model_copy(update={"msg_id": value}), True

    @unavailable
    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.r.hgetall(self._k("job", job_id))
        if not raw:
            return None
        return JobRecord.from_fields({k.decode(): v.decode() for k, v in raw.items()})

    @unavailable
    async def position(self, job: JobRecord) -> int | None:
        if job.status != "queued" or job.msg_id is None:
            return None
        key = self._stream(class_stream(job.stream, job.priority))
        try:
            groups = await self.r.xinfo_groups(key)
        except ResponseError:
            return None
        last = next((g["last-delivered-id"] for g in groups if g["name"] in (GROUP, GROUP.encode())), b"0-0")
        last = last.decode() if isinstance(last, bytes) else last
        if parse_id(job.msg_id) <= parse_id(last):
            return 0  # delivered, about to start
        ahead = await self.r.xrange(key, min=f"({last}", max=f"({job.msg_id}")
        higher = await self._waiting(keys=[self._stream(s) for s in higher_classes(job.stream, job.priority)],
                                     args=[GROUP])
        return sum(int(n) for n in higher) + len(ahead)

    @unavailable
    async def depth(self, stream: str) -> int:
        counts = await self._waiting(keys=[self._stream(name) for name, _ in class_streams([stream])], args=[GROUP])
        return sum(int(n) for n in counts)

    @unavailable
    async def fetch_image(self, job_id: str, k: int) -> bytes | None:
        return await self.r.hget(self._k("img", job_id), str(k))

    @unavailable
    async def _drop_queued(self, stream: str, msg_id: str) -> None:
        await self.r.xdel(self._stream(stream), msg_id)

    @unavailable
    async def read_events(self, job_id: str, after: str | None, block_ms: int) -> list[JobEvent]:
        key = self._k("events", job_id)
        reply = await self.r.xread({key: after or "0-0"}, count=100, block=block_ms if block_ms > 0 else None)
        out = []
        for _, entries in reply or []:
            for msg_id, fields in entries:
                data = json.loads(fields[b"e"])
                if b"pos" in fields:
                    data["queue_position"] = int(fields[b"pos"])
                out.append(JobEvent(msg_id.decode(), data))
        return out

    @unavailable
    async def transition(self, job_id: str, to: str, from_states: Iterable[str], ttl_s: int,
                         emit: Emission | None = None, **fields: object) -> JobRecord | None:
        emit = emit or events.state_change(job_id, to)
        states = [json.dumps(s) for s in from_states]
        args: list[Any] = [ttl_s, self.events_maxlen, emit.encoded(), emit.hook or "", job_id, len(states), *states]
        for key, value in encode_fields(**fields, status=to).items():
            args += [key, value]
        keys = [self._k("job", job_id), self._k("events", job_id), self._k("webhooks")]
        updated = await self._transition(keys=keys, args=args)
        return record(updated) if updated else None

    @unavailable
    async def set_progress(self, progress: dict[str, tuple[int, int]]) -> dict[str, str | None]:
        ids = list(progress)
        if not ids:
            return {}
        args: list[Any] = [self.events_maxlen]
        for i in ids:
            step, total = progress[i]
            args += [i, json.dumps([step, total]), events.progress(i, step, total).encoded()]
        keys = [self._k("job", i) for i in ids] + [self._k("events", i) for i in ids] + [self._k("webhooks")]
        statuses = await self._progress(keys=keys, args=args)
        return {i: (json.loads(s) if s else None) for i, s in zip(ids, statuses, strict=True)}

    @unavailable
    async def store_images(self, job_id: str, pngs: list[bytes], ttl_s: int) -> None:
        key = self._k("img", job_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        if pngs:
            pipe.hset(key, mapping={str(k): png for k, png in enumerate(pngs)})
        pipe.expire(key, ttl_s)
        await pipe.execute()

    @unavailable
    async def record_webhook_attempt(self, job_id: str, attempt: dict, keep: int) -> None:
        await self._attempt(keys=[self._k("job", job_id)], args=[json.dumps(attempt), keep])
