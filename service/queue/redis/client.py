"""The Redis connection the three roles share: the client, the key layout, and outage -> QueueUnavailable.

Keys (P = redis_prefix): P:job:ID (hash of JSON values), P:img:ID (hash k -> PNG), P:idem:KEY (job id),
P:stream:MODEL|PRECISION (normal priority) and P:stream:MODEL|PRECISION#pN (priority N != 5) (entries {job: ID},
group "workers"), P:worker:ID (heartbeat JSON with TTL), P:control (broadcast stream, read without a group),
P:op:ID (re-quantize operation), P:lock:NAME. Acked entries are deleted, so XLEN - pending = jobs waiting.
P:events:ID (the job's events: entries {e: JSON[, pos: queue position]}, MAXLEN events_maxlen, expiring with the
job), P:webhooks (the webhook outbox: entries {job, hook, event}, group "dispatchers").
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.jobs import JobRecord
from service.queue.base import QueueUnavailable

GROUP = "workers"
WEBHOOK_GROUP = "dispatchers"
T = TypeVar("T")


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=5,
        # Pooled connections go stale when Redis restarts: retry once on a fresh one before reporting 503.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def unavailable(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
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


def record(flat: list[bytes]) -> JobRecord:
    """A job hash as a script returns it (HGETALL's flat field, value list) -> the record."""
    return JobRecord.from_fields({flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)})


class RedisRole:
    """One role over the shared client: its keys are all under `prefix`."""

    def __init__(self, r: aioredis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _stream(self, stream: str) -> str:
        return self._k("stream", stream)
