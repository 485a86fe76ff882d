"""The JobQueue contract, run against both backends: in-memory and a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import pytest_asyncio

from service.jobs import JobRecord, stream_name
from service.queue import IdempotencyConflict, MemoryQueue, QueueFull, QueueUnavailable

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.asyncio
STREAM = stream_name("tiny", "fp32")
TTL = 60


def job(**kw: object) -> JobRecord:
    fields = {"model": "tiny", "precision": "fp32", "sampler": "ddim", "steps": 2, "n": 1, "seed": 7, **kw}
    return JobRecord(**fields)


NO_REDIS = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=NO_REDIS)])
async def queue(request: pytest.FixtureRequest):
    if request.param == "memory":
        q = MemoryQueue()
    else:
        from service.queue.redis import RedisQueue

        server = request.getfixturevalue("redis_server")
        q = RedisQueue(server.url, request.getfixturevalue("redis_prefix"))
    await q.ensure_streams([STREAM])
    yield q
    await q.close()


async def test_submit_get_position_depth(queue):
    a, created = await queue.submit(job(), None, 10, TTL)
    b, _ = await queue.submit(job(seed=8), None, 10, TTL)
    assert created and a.msg_id is not None
    assert (await queue.get(a.id)).model_dump() == a.model_dump()
    assert await queue.position(a) == 0 and await queue.position(b) == 1
    assert await queue.depth(STREAM) == 2
    assert await queue.get("nope") is None


async def test_read_respects_count_and_fifo_then_ack(queue):
    jobs = [(await queue.submit(job(seed=s), None, 10, TTL))[0] for s in range(3)]
    first = await queue.read([STREAM], "w1", 2, 100)
    assert [d.job_id for d in first] == [jobs[0].id, jobs[1].id]
    assert await queue.depth(STREAM) == 1
    assert await queue.position(await queue.get(jobs[2].id)) == 0
    rest = await queue.read([STREAM], "w1", 5, 100)
    assert [d.job_id for d in rest] == [jobs[2].id]
    for d in first + rest:
        await queue.ack(d)
    assert await queue.read([STREAM], "w1", 5, 50) == []
    assert await queue.reclaim(STREAM, "w2", 0, 10) == []  # acked entries are gone for good


async def test_read_blocks_until_a_job_arrives(queue):
    reader = asyncio.create_task(queue.read([STREAM], "w1", 4, 2000))
    await asyncio.sleep(0.1)
    submitted, _ = await queue.submit(job(), None, 10, TTL)
    t0 = time.monotonic()
    got = await reader
    assert [d.job_id for d in got] == [submitted.id] and time.monotonic() - t0 < 1.5


async def test_queue_full(queue):
    await queue.submit(job(), None, 2, TTL)
    await queue.submit(job(), None, 2, TTL)
    with pytest.raises(QueueFull) as info:
        await queue.submit(job(), None, 2, TTL)
    assert info.value.depth == 2
    await queue.read([STREAM], "w1", 1, 50)  # delivered jobs no longer count as waiting
    await queue.submit(job(), None, 2, TTL)


async def test_idempotency_key_returns_same_job(queue):
    a, created_a = await queue.submit(job(fingerprint="f1"), "key-1", 10, TTL)
    b, created_b = await queue.submit(job(fingerprint="f1", seed=99), "key-1", 10, TTL)
    assert created_a and not created_b and b.id == a.id and b.seed == a.seed
    assert await queue.depth(STREAM) == 1
    with pytest.raises(IdempotencyConflict):
        await queue.submit(job(fingerprint="other"), "key-1", 10, TTL)


async def test_transition_is_conditional(queue):
    a, _ = await queue.submit(job(), None, 10, TTL)
    running = await queue.transition(a.id, "running", ("queued",), TTL, worker="w1", attempts=1)
    assert running.status == "running" and running.worker == "w1" and running.attempts == 1
    assert await queue.transition(a.id, "running", ("queued",), TTL) is None
    assert await queue.transition("missing", "running", ("queued",), TTL) is None
    statuses = await queue.set_progress({a.id: (3, 10), "missing": (1, 2)})
    assert statuses == {a.id: "running", "missing": None}
    got = await queue.get(a.id)
    assert (got.progress_step, got.progress_total) == (3, 10)


async def test_cancel_queued_leaves_the_stream(queue):
    a, _ = await queue.submit(job(), None, 10, TTL)
    b, _ = await queue.submit(job(), None, 10, TTL)
    cancelled = await queue.cancel(a.id, TTL)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert await queue.depth(STREAM) == 1 and await queue.position(await queue.get(b.id)) == 0
    assert [d.job_id for d in await queue.read([STREAM], "w1", 5, 50)] == [b.id]
    assert (await queue.cancel(a.id, TTL)).status == "cancelled"  # idempotent
    assert await queue.cancel("missing", TTL) is None


async def test_cancel_running_is_seen_by_progress(queue):
    a, _ = await queue.submit(job(), None, 10, TTL)
    await queue.read([STREAM], "w1", 1, 50)
    await queue.transition(a.id, "running", ("queued",), TTL)
    assert (await queue.cancel(a.id, TTL)).status == "cancelled"
    assert await queue.set_progress({a.id: (1, 2)}) == {a.id: "cancelled"}
    assert await queue.transition(a.id, "succeeded", ("running",), TTL) is None  # never resurrected


async def test_reclaim_after_idle_and_renew_keeps_the_lease(queue):
    a, _ = await queue.submit(job(), None, 10, TTL)
    b, _ = await queue.submit(job(), None, 10, TTL)
    held = await queue.read([STREAM], "dead", 1, 50)
    renewed = await queue.read([STREAM], "alive", 1, 50)
    await asyncio.sleep(0.3)
    await queue.renew(renewed, "alive")
    claimed = await queue.reclaim(STREAM, "rescuer", 200, 10)
    assert [d.job_id for d in claimed] == [held[0].job_id] == [a.id]
    assert await queue.reclaim(STREAM, "other", 200, 10) == []  # the rescuer now holds it, freshly
    await queue.ack(claimed[0])
    await queue.ack(renewed[0])
    assert b.id == renewed[0].job_id


async def test_images_and_ttl(queue):
    a, _ = await queue.submit(job(n=2), None, 10, TTL)
    await queue.store_images(a.id, [b"png0", b"png1"], 1)
    assert await queue.fetch_image(a.id, 1) == b"png1"
    assert await queue.fetch_image(a.id, 2) is None
    short, _ = await queue.submit(job(), None, 10, 1)
    await asyncio.sleep(1.2)
    assert await queue.get(short.id) is None and await queue.fetch_image(a.id, 0) is None


async def test_registry_control_and_operations(queue):
    await queue.heartbeat("w1", {"id": "w1", "ready": True}, 0.5)
    assert await queue.workers() == [{"id": "w1", "ready": True}]
    last, old = await queue.read_control(None, 0)
    assert old == []
    await queue.publish_control({"type": "requantize", "id": "op1"})
    last, msgs = await queue.read_control(last, 100)
    assert msgs == [{"type": "requantize", "id": "op1"}]
    assert (await queue.read_control(last, 50))[1] == []
    await queue.set_operation("op1", {"type": "requantize"}, TTL)
    await queue.set_operation("op1", {"worker:w1": {"state": "done"}}, TTL)
    assert await queue.get_operation("op1") == {"type": "requantize", "worker:w1": {"state": "done"}}
    await asyncio.sleep(0.6)
    assert await queue.workers() == []


async def test_redis_down_raises_unavailable(redis_prefix):
    from service.queue.redis import RedisQueue
    from service.testing import free_port

    q = RedisQueue(f"redis://127.0.0.1:{free_port()}/0", redis_prefix)
    assert await q.ping() is False
    with pytest.raises(QueueUnavailable):
        await q.submit(job(), None, 10, TTL)
    with pytest.raises(QueueUnavailable):
        await q.get("x")
    await q.close()


async def test_named_lock_has_one_owner_and_expires(queue):
    assert await queue.acquire_lock("calibrate:tiny:w8a8", "w1", 300)
    assert await queue.acquire_lock("calibrate:tiny:w8a8", "w1", 300)  # re-entrant for its owner
    assert not await queue.acquire_lock("calibrate:tiny:w8a8", "w2", 300)
    await queue.release_lock("calibrate:tiny:w8a8", "w2")  # not the owner: no effect
    assert not await queue.acquire_lock("calibrate:tiny:w8a8", "w2", 300)
    await queue.release_lock("calibrate:tiny:w8a8", "w1")
    assert await queue.acquire_lock("calibrate:tiny:w8a8", "w2", 300)
    await asyncio.sleep(0.4)  # the owner died: the lock lapses
    assert await queue.acquire_lock("calibrate:tiny:w8a8", "w3", 300)
