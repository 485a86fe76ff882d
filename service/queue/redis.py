"""Redis Streams JobQueue: a stream + consumer group per model+precision and priority, job state in hashes with TTL.

Keys (P = redis_prefix): P:job:ID (hash of JSON values), P:img:ID (hash k -> PNG), P:idem:KEY (job id),
P:stream:MODEL|PRECISION (normal priority) and P:stream:MODEL|PRECISION#pN (priority N != 5) (entries {job: ID},
group "workers"), P:worker:ID (heartbeat JSON with TTL), P:control (broadcast stream, read without a group),
P:op:ID (re-quantize operation). Acked entries are deleted, so XLEN - pending = jobs waiting. P:events:ID (the job's
events: entries {e: JSON[, pos: queue position]}, MAXLEN events_maxlen, expiring with the job), P:webhooks (the
webhook outbox: entries {job, hook, event}, group "dispatchers"). Every script that changes a job's state appends
its event (and outbox task) in the same step.

A read is one script over the class streams in priority order (service.priority), so a batch never takes more
than `count` entries however many classes have work; a blocking read waits with a plain XREAD from each class's
last id, which delivers nothing and wakes on the first new entry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
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
from service.priority import (
    DEFAULT_AGING_BATCHES,
    AgingCounter,
    Head,
    class_stream,
    class_streams,
    higher_classes,
    parse_id,
    passed_over,
    read_order,
)
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

# Entries of a class stream not yet delivered to the group (acked entries are deleted, so XLEN - pending).
_WAITING_FN = """
local function waiting(key, group)
  if redis.call('EXISTS', key) == 0 then return 0 end
  local ok, pending = pcall(redis.call, 'XPENDING', key, group)
  if not ok then return redis.call('XLEN', key) end
  return redis.call('XLEN', key) - pending[1]
end
"""

# KEYS: job, class stream, idem ('' for none), events, outbox, every class stream of the model+precision from the
# highest level down. ARGV: job id, ttl, max depth, group, events maxlen, queued event JSON, how many of those
# classes are above the job's (their waiting jobs are served first), field, value, ...
# The depth limit counts every class; the queued event's position counts the higher classes and the job's own.
_SUBMIT = _EMIT + _WAITING_FN + """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'existing', existing} end
end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[4], '0', 'MKSTREAM')
local waiting_all, ahead = 0, 0
local n_higher = tonumber(ARGV[7])
for i = 6, #KEYS do
  local w = waiting(KEYS[i], ARGV[4])
  waiting_all = waiting_all + w
  if i - 5 <= n_higher or KEYS[i] == KEYS[2] then ahead = ahead + w end
end
if waiting_all >= tonumber(ARGV[3]) then return {'full', tostring(waiting_all)} end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'msg_id', cjson.encode(id))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2]) end
emit(KEYS[1], KEYS[4], KEYS[5], ARGV[5], tonumber(ARGV[2]) * 1000, ARGV[6], '', ARGV[1], tostring(ahead))
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

# KEYS: class streams. ARGV: group. Returns the waiting entries of each.
_WAITING = _WAITING_FN + """
local out = {}
for i, key in ipairs(KEYS) do out[i] = waiting(key, ARGV[1]) end
return out
"""

# KEYS: class streams in read order. ARGV: group, consumer, count (0: only report).
# Returns {entries, heads, tails}: entries = {key index, entry id, job id, ...} read in KEYS order, at most count;
# heads = each key's oldest waiting entry id after the read ('' for none); tails = each key's last entry id
# ('0-0' for none), from which a blocking XREAD wakes only on entries added later.
_READ = """
local group, consumer, remaining = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function last_delivered(key)
  if redis.call('EXISTS', key) == 0 then return nil end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info['last-delivered-id'] end
  end
  redis.call('XGROUP', 'CREATE', key, group, '0')  -- the group was lost (a restart without persistence)
  return '0-0'
end
local entries = {}
for i, key in ipairs(KEYS) do
  if remaining <= 0 then break end
  if last_delivered(key) then
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
    if reply then
      for _, entry in ipairs(reply[1][2]) do
        local job = ''
        for j = 1, #entry[2], 2 do if entry[2][j] == 'job' then job = entry[2][j + 1] end end
        table.insert(entries, i)
        table.insert(entries, entry[1])
        table.insert(entries, job)
        remaining = remaining - 1
      end
    end
  end
end
local heads, tails = {}, {}
for i, key in ipairs(KEYS) do
  heads[i], tails[i] = '', '0-0'
  local last = last_delivered(key)
  if last then
    local first = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1)
    if first[1] then heads[i] = first[1][1] end
    local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if newest[1] then tails[i] = newest[1][1] end
  end
end
return {entries, heads, tails}
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
    def __init__(self, url: str, prefix: str = "ptq4dm", events_maxlen: int = 500,
                 aging_batches: int = DEFAULT_AGING_BATCHES) -> None:
        self.prefix = prefix
        self.events_maxlen = events_maxlen
        self._aging = AgingCounter(aging_batches)
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
        self._waiting = self.r.register_script(_WAITING)
        self._read = self.r.register_script(_READ)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _stream(self, stream: str) -> str:
        return self._k("stream", stream)

    # -- producer side ---------------------------------------------------------------------------------------------
    @_unavailable
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

    @_unavailable
    async def depth(self, stream: str) -> int:
        counts = await self._waiting(keys=[self._stream(name) for name, _ in class_streams([stream])], args=[GROUP])
        return sum(int(n) for n in counts)

    @_unavailable
    async def fetch_image(self, job_id: str, k: int) -> bytes | None:
        return await self.r.hget(self._k("img", job_id), str(k))

    @_unavailable
    async def _drop_queued(self, stream: str, msg_id: str) -> None:
        await self.r.xdel(self._stream(stream), msg_id)

    # -- worker side -----------------------------------------------------------------------------------------------
    @_unavailable
    async def ensure_streams(self, streams: Iterable[str]) -> None:
        for name, _ in class_streams(streams):
            try:
                await self.r.xgroup_create(self._stream(name), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    @_unavailable
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
        """One _READ script: (deliveries, each class's oldest waiting id, each class's last id)."""
        entries, heads, tails = await self._read(keys=[self._stream(name) for name in order],
                                                 args=[GROUP, consumer, count])
        out = [Delivery(order[int(entries[i]) - 1], entries[i + 1].decode(), entries[i + 2].decode())
               for i in range(0, len(entries), 3)]
        return (out, {name: parse_id(h.decode()) if h else None for name, h in zip(order, heads, strict=True)},
                {name: t.decode() for name, t in zip(order, tails, strict=True)})

    @_unavailable
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
