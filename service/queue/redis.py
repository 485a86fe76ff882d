"""Redis Streams JobQueue: a stream + consumer group per model+precision, job state in hashes with TTL.

Keys (P = redis_prefix): P:job:ID (hash of JSON values), P:img:ID (hash k -> PNG), P:idem:KEY (job id),
P:stream:MODEL|PRECISION (entries {job: ID}, group "workers"), P:worker:ID (heartbeat JSON with TTL),
P:control (broadcast stream, read without a group), P:op:ID (re-quantize operation). Acked entries are deleted,
so XLEN - pending = jobs waiting. P:events:ID (the job's events: entries {e: JSON[, pos: queue position]}, MAXLEN
events_maxlen, expiring with the job), P:webhooks (the webhook outbox: entries {job, hook, event}, group
"dispatchers"). Every script that changes a job's state appends its event (and outbox task) in the same step.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service import events
from service.events import Emission, JobEvent
from service.jobs import JobRecord, encode_fields
from service.queue.base import Delivery, IdempotencyConflict, JobQueue, QueueFull, QueueUnavailable, WebhookTask
from service.webhooks import OUTBOX_MAXLEN

GROUP = "workers"
WEBHOOK_GROUP = "dispatchers"
T = TypeVar("T")

# Appends an event to a job's event stream (MAXLEN, expiring with the job) and, when the job's webhook subscribed to
# `hook`, a task to the webhook outbox. Returns the event id.
_EMIT = """
local function emit(job_key, ev_key, outbox_key, maxlen, ttl_ms, payload, hook, job_id, pos)
  local id
  if pos then
    id = redis.call('XADD', ev_key, 'MAXLEN', maxlen, '*', 'e', payload, 'pos', pos)
  else
    id = redis.call('XADD', ev_key, 'MAXLEN', maxlen, '*', 'e', payload)
  end
  if ttl_ms > 0 then redis.call('PEXPIRE', ev_key, ttl_ms) end
  if hook ~= '' then
    local url = redis.call('HGET', job_key, 'webhook')
    if url and url ~= 'null' then
      local wanted = cjson.decode(redis.call('HGET', job_key, 'webhook_events') or '[]')
      for _, w in ipairs(wanted) do
        if w == hook then
          redis.call('XADD', outbox_key, 'MAXLEN', '~', '""" + str(OUTBOX_MAXLEN) + """', '*',
                     'job', job_id, 'hook', hook, 'event', id)
          break
        end
      end
    end
  end
  return id
end
"""

# KEYS: job, stream, idem ('' for none), events, outbox. ARGV: job id, ttl, max depth, group, events maxlen,
# queued event JSON, field, value, ...
_SUBMIT = _EMIT + """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'existing', existing} end
end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[4], '0', 'MKSTREAM')
local waiting = redis.call('XLEN', KEYS[2]) - redis.call('XPENDING', KEYS[2], ARGV[4])[1]
if waiting >= tonumber(ARGV[3]) then return {'full', tostring(waiting)} end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'msg_id', cjson.encode(id))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2]) end
emit(KEYS[1], KEYS[4], KEYS[5], ARGV[5], tonumber(ARGV[2]) * 1000, ARGV[6], '', ARGV[1], tostring(waiting))
return {'created', id}
"""

# KEYS: job, events, outbox. ARGV: ttl, events maxlen, event JSON, hook ('' for none), job id, n_from, from...,
# field, value, ... (all values JSON text). 1 = applied, 0 = not, -1 = gone.
_TRANSITION = _EMIT + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
local n = tonumber(ARGV[6])
local ok = false
for i = 7, n + 6 do if ARGV[i] == cur then ok = true end end
if not ok then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, n + 7))
redis.call('EXPIRE', KEYS[1], ARGV[1])
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[1]) * 1000, ARGV[3], ARGV[4], ARGV[5], nil)
return 1
"""

# KEYS: n jobs, their n event streams, the outbox. ARGV: events maxlen, then per job: id, step_total JSON pair,
# event JSON. Returns each status (JSON text) or false.
_PROGRESS = _EMIT + """
local out = {}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local key = KEYS[i]
  local cur = redis.call('HGET', key, 'status')
  if cur == '"running"' then
    local base = 3 * (i - 1) + 1
    local p = cjson.decode(ARGV[base + 2])
    redis.call('HSET', key, 'progress_step', tostring(p[1]), 'progress_total', tostring(p[2]))
    emit(key, KEYS[n + i], KEYS[#KEYS], ARGV[1], redis.call('PTTL', key), ARGV[base + 3], 'progress', ARGV[base + 1],
         nil)
  end
  out[i] = cur
end
return out
"""

# KEYS: job. ARGV: attempt JSON, how many to keep. Appends to the job's webhook_attempts (a JSON list).
_ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], 'webhook_attempts')
local list = {}
if raw and raw ~= '[]' then list = cjson.decode(raw) end
table.insert(list, cjson.decode(ARGV[1]))
while #list > tonumber(ARGV[2]) do table.remove(list, 1) end
redis.call('HSET', KEYS[1], 'webhook_attempts', cjson.encode(list))
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _unavailable(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Connection trouble becomes QueueUnavailable, which the API maps to 503 and workers retry on."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise QueueUnavailable(f"redis unreachable: {exc}") from exc
        except ResponseError as exc:
            if str(exc).startswith("LOADING"):
                raise QueueUnavailable(f"redis is loading: {exc}") from exc
            raise

    return wrapper


class RedisQueue(JobQueue):
    def __init__(self, url: str, prefix: str = "ptq4dm", events_maxlen: int = 500) -> None:
        self.prefix = prefix
        self.events_maxlen = events_maxlen
        self.r = aioredis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=5,
            # Pooled connections go stale when Redis restarts: retry once on a fresh one before reporting 503.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._submit = self.r.register_script(_SUBMIT)
        self._transition = self.r.register_script(_TRANSITION)
        self._progress = self.r.register_script(_PROGRESS)
        self._release = self.r.register_script(_RELEASE)
        self._attempt = self.r.register_script(_ATTEMPT)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _stream(self, stream: str) -> str:
        return self._k("stream", stream)

    def _from_stream_key(self, key: bytes | str) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return key[len(self._k("stream", "")):]

    # -- producer side ---------------------------------------------------------------------------------------------
    @_unavailable
    async def submit(self, job: JobRecord, idempotency_key: str | None, max_depth: int,
                     ttl_s: int) -> tuple[JobRecord, bool]:
        idem = self._k("idem", idempotency_key) if idempotency_key is not None else ""
        args: list[Any] = [job.id, ttl_s, max_depth, GROUP, self.events_maxlen, events.queued(job.id).encoded()]
        for key, value in job.to_fields().items():
            args += [key, value]
        keys = [self._k("job", job.id), self._stream(job.stream), idem, self._k("events", job.id), self._k("webhooks")]
        kind, value = await self._submit(keys=keys, args=args)
        kind, value = kind.decode(), value.decode()
        if kind == "full":
            raise QueueFull(job.stream, int(value))
        if kind == "existing":
            existing = await self.get(value)
            if existing is not None:
                if existing.fingerprint != job.fingerprint:
                    raise IdempotencyConflict("Idempotency-Key was already used for a different request")
                return existing, False
            await self.r.delete(idem)  # the key outlived its job: start over with a fresh one
            return await self.submit(job, idempotency_key, max_depth, ttl_s)
        return job.model_copy(update={"msg_id": value}), True

    @_unavailable
    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.r.hgetall(self._k("job", job_id))
        if not raw:
            return None
        return JobRecord.from_fields({k.decode(): v.decode() for k, v in raw.items()})

    @_unavailable
    async def position(self, job: JobRecord) -> int | None:
        if job.status != "queued" or job.msg_id is None:
            return None
        key = self._stream(job.stream)
        try:
            groups = await self.r.xinfo_groups(key)
        except ResponseError:
            return None
        last = next((g["last-delivered-id"] for g in groups if g["name"] in (GROUP, GROUP.encode())), b"0-0")
        last = last.decode() if isinstance(last, bytes) else last
        if _id_tuple(job.msg_id) <= _id_tuple(last):
            return 0  # delivered, about to start
        ahead = await self.r.xrange(key, min=f"({last}", max=f"({job.msg_id}")
        return len(ahead)

    @_unavailable
    async def depth(self, stream: str) -> int:
        key = self._stream(stream)
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(key)
        pipe.xpending(key, GROUP)
        try:
            length, pending = await pipe.execute()
        except ResponseError:  # no group yet
            return int(await self.r.xlen(key))
        return int(length) - int(pending["pending"])

    @_unavailable
    async def fetch_image(self, job_id: str, k: int) -> bytes | None:
        return await self.r.hget(self._k("img", job_id), str(k))

    @_unavailable
    async def _drop_queued(self, stream: str, msg_id: str) -> None:
        await self.r.xdel(self._stream(stream), msg_id)

    # -- worker side -----------------------------------------------------------------------------------------------
    @_unavailable
    async def ensure_streams(self, streams: Iterable[str]) -> None:
        for stream in streams:
            try:
                await self.r.xgroup_create(self._stream(stream), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    @_unavailable
    async def read(self, streams: list[str], consumer: str, count: int, block_ms: int) -> list[Delivery]:
        keys = {self._stream(s): ">" for s in streams}
        try:
            reply = await self.r.xreadgroup(GROUP, consumer, keys, count=count,
                                            block=block_ms if block_ms > 0 else None)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_streams(streams)  # Redis lost its data (restart without persistence)
            return []
        out = []
        for key, entries in reply or []:
            for msg_id, fields in entries:
                out.append(Delivery(self._from_stream_key(key), msg_id.decode(), fields[b"job"].decode()))
        return out[:count]

    @_unavailable
    async def reclaim(self, stream: str, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        try:
            reply = await self.r.xautoclaim(self._stream(stream), GROUP, consumer, min_idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        entries = reply[1]
        return [Delivery(stream, msg_id.decode(), fields[b"job"].decode()) for msg_id, fields in entries if fields]

    @_unavailable
    async def renew(self, deliveries: Iterable[Delivery], consumer: str) -> None:
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.msg_id)
        for stream, ids in by_stream.items():
            # XCLAIM with min-idle 0 by the owner itself just resets the idle clock; JUSTID keeps the count.
            await self.r.xclaim(self._stream(stream), GROUP, consumer, 0, ids, justid=True)

    @_unavailable
    async def ack(self, delivery: Delivery) -> None:
        pipe = self.r.pipeline(transaction=True)
        key = self._stream(delivery.stream)
        pipe.xack(key, GROUP, delivery.msg_id)
        pipe.xdel(key, delivery.msg_id)
        await pipe.execute()

    @_unavailable
    async def transition(self, job_id: str, to: str, from_states: Iterable[str], ttl_s: int,
                         emit: Emission | None = None, **fields: object) -> JobRecord | None:
        emit = emit or events.state_change(job_id, to)
        states = [json.dumps(s) for s in from_states]
        args: list[Any] = [ttl_s, self.events_maxlen, emit.encoded(), emit.hook or "", job_id, len(states), *states]
        for key, value in encode_fields(**fields, status=to).items():
            args += [key, value]
        keys = [self._k("job", job_id), self._k("events", job_id), self._k("webhooks")]
        applied = await self._transition(keys=keys, args=args)
        return await self.get(job_id) if applied == 1 else None

    @_unavailable
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

    @_unavailable
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

    # -- webhook outbox --------------------------------------------------------------------------------------------
    @_unavailable
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

    @_unavailable
    async def renew_webhooks(self, tasks: Iterable[WebhookTask], consumer: str) -> None:
        ids = [t.msg_id for t in tasks]
        if ids:
            await self.r.xclaim(self._k("webhooks"), WEBHOOK_GROUP, consumer, 0, ids, justid=True)

    @_unavailable
    async def ack_webhook(self, task: WebhookTask) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self._k("webhooks"), WEBHOOK_GROUP, task.msg_id)
        pipe.xdel(self._k("webhooks"), task.msg_id)
        await pipe.execute()

    @_unavailable
    async def record_webhook_attempt(self, job_id: str, attempt: dict, keep: int) -> None:
        await self._attempt(keys=[self._k("job", job_id)], args=[json.dumps(attempt), keep])

    @_unavailable
    async def store_images(self, job_id: str, pngs: list[bytes], ttl_s: int) -> None:
        key = self._k("img", job_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        if pngs:
            pipe.hset(key, mapping={str(k): png for k, png in enumerate(pngs)})
        pipe.expire(key, ttl_s)
        await pipe.execute()

    # -- registry and control --------------------------------------------------------------------------------------
    @_unavailable
    async def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        await self.r.set(self._k("worker", worker_id), json.dumps(info), px=max(1, int(ttl_s * 1000)))

    @_unavailable
    async def workers(self) -> list[dict]:
        keys = [k async for k in self.r.scan_iter(match=self._k("worker", "*"), count=100)]
        values = await self.r.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    @_unavailable
    async def remove_worker(self, worker_id: str) -> None:
        await self.r.delete(self._k("worker", worker_id))

    @_unavailable
    async def publish_control(self, message: dict) -> str:
        msg_id = await self.r.xadd(self._k("control"), {"m": json.dumps(message)}, maxlen=1000, approximate=True)
        return msg_id.decode()

    @_unavailable
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

    @_unavailable
    async def set_operation(self, op_id: str, fields: dict, ttl_s: int) -> None:
        key = self._k("op", op_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={k: json.dumps(v) for k, v in fields.items()})
        pipe.expire(key, ttl_s)
        await pipe.execute()

    @_unavailable
    async def get_operation(self, op_id: str) -> dict | None:
        raw = await self.r.hgetall(self._k("op", op_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()} or None

    @_unavailable
    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        key = self._k("lock", name)
        if await self.r.set(key, owner, nx=True, px=ttl_ms):
            return True
        return (await self.r.get(key)) == owner.encode()

    @_unavailable
    async def release_lock(self, name: str, owner: str) -> None:
        await self._release(keys=[self._k("lock", name)], args=[owner])

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.r.aclose()


def _webhook_task(msg_id: bytes, fields: dict[bytes, bytes]) -> WebhookTask:
    return WebhookTask(msg_id.decode(), fields[b"job"].decode(), fields[b"hook"].decode(), fields[b"event"].decode())


def _id_tuple(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)
