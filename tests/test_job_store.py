"""The JobStore contract, run against both backends: in-memory and a real redis-server.

Submitting appends to the work stream, so some tests read through the WorkStream role to see depth and positions
change; the stream's own contract is tests/test_work_stream.py.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from service.jobs import stream_name
from service.queue import IdempotencyConflict, QueueFull, QueueUnavailable
from service.testing import BACKENDS, open_backend
from service.testing import job_record as job

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.asyncio
STREAM = stream_name("tiny", "fp32")
TTL = 60


@pytest_asyncio.fixture(params=BACKENDS)
async def queue(request: pytest.FixtureRequest):
    backend = open_backend(request)
    await backend.stream.ensure_streams([STREAM])
    yield backend
    await backend.close()


async def test_submit_get_position_depth(queue):
    store = queue.store
    a, created = await store.submit(job(), None, 10, TTL)
    b, _ = await store.submit(job(seed=8), None, 10, TTL)
    assert created and a.msg_id is not None
    assert (await store.get(a.id)).model_dump() == a.model_dump()
    assert await store.position(a) == 0 and await store.position(b) == 1
    assert await store.depth(STREAM) == 2
    assert await store.get("nope") is None


async def test_positions_and_depth_follow_deliveries(queue):
    jobs = [(await queue.store.submit(job(seed=s), None, 10, TTL))[0] for s in range(3)]
    await queue.stream.read([STREAM], "w1", 2, 100)
    assert await queue.store.depth(STREAM) == 1
    assert await queue.store.position(await queue.store.get(jobs[2].id)) == 0


async def test_queue_full(queue):
    store = queue.store
    await store.submit(job(), None, 2, TTL)
    await store.submit(job(), None, 2, TTL)
    with pytest.raises(QueueFull) as info:
        await store.submit(job(), None, 2, TTL)
    assert info.value.depth == 2
    await queue.stream.read([STREAM], "w1", 1, 50)  # delivered jobs no longer count as waiting
    await store.submit(job(), None, 2, TTL)


async def test_idempotency_key_returns_same_job(queue):
    store = queue.store
    a, created_a = await store.submit(job(fingerprint="f1"), "key-1", 10, TTL)
    b, created_b = await store.submit(job(fingerprint="f1", seed=99), "key-1", 10, TTL)
    assert created_a and not created_b and b.id == a.id and b.seed == a.seed
    assert b.model_dump() == (await store.get(a.id)).model_dump()  # the stored record, as the submit script read it
    assert await store.depth(STREAM) == 1
    with pytest.raises(IdempotencyConflict):
        await store.submit(job(fingerprint="other"), "key-1", 10, TTL)


async def test_idempotency_key_outliving_its_job_starts_over(queue):
    store = queue.store
    short, _ = await store.submit(job(fingerprint="f1"), "key-2", 10, 1)
    await asyncio.sleep(0.5)
    again, created = await store.submit(job(fingerprint="f1"), "key-2", 10, TTL)
    assert not created and again.id == short.id
    await asyncio.sleep(0.8)  # the job expired (its key may linger on Redis): a fresh job under the same key
    fresh, created = await store.submit(job(fingerprint="f1"), "key-2", 10, TTL)
    assert created and fresh.id != short.id


async def test_transition_is_conditional(queue):
    store = queue.store
    a, _ = await store.submit(job(), None, 10, TTL)
    running = await store.transition(a.id, "running", ("queued",), TTL, worker="w1", attempts=1)
    assert running.status == "running" and running.worker == "w1" and running.attempts == 1
    assert running.model_dump() == (await store.get(a.id)).model_dump()  # the whole updated record comes back
    assert await store.transition(a.id, "running", ("queued",), TTL) is None
    assert await store.transition("missing", "running", ("queued",), TTL) is None
    statuses = await store.set_progress({a.id: (3, 10), "missing": (1, 2)})
    assert statuses == {a.id: "running", "missing": None}
    got = await store.get(a.id)
    assert (got.progress_step, got.progress_total) == (3, 10)
    done = await store.transition(a.id, "succeeded", ("running",), TTL, compute_s=1.5)
    assert (done.progress_step, done.compute_s, done.worker) == (3, 1.5, "w1")  # fields set earlier are kept


async def test_cancel_queued_leaves_the_stream(queue):
    store = queue.store
    a, _ = await store.submit(job(), None, 10, TTL)
    b, _ = await store.submit(job(), None, 10, TTL)
    cancelled = await store.cancel(a.id, TTL)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert await store.depth(STREAM) == 1 and await store.position(await store.get(b.id)) == 0
    assert [d.job_id for d in await queue.stream.read([STREAM], "w1", 5, 50)] == [b.id]
    assert (await store.cancel(a.id, TTL)).status == "cancelled"  # idempotent
    assert await store.cancel("missing", TTL) is None


async def test_cancel_running_is_seen_by_progress(queue):
    store = queue.store
    a, _ = await store.submit(job(), None, 10, TTL)
    await queue.stream.read([STREAM], "w1", 1, 50)
    await store.transition(a.id, "running", ("queued",), TTL)
    assert (await store.cancel(a.id, TTL)).status == "cancelled"
    assert await store.set_progress({a.id: (1, 2)}) == {a.id: "cancelled"}
    assert await store.transition(a.id, "succeeded", ("running",), TTL) is None  # never resurrected


async def test_wait_returns_at_the_terminal_state(queue):
    store = queue.store
    a, _ = await store.submit(job(), None, 10, TTL)
    assert (await store.wait(a.id, 0.1)).status == "queued"  # timed out: the last record
    waiter = asyncio.create_task(store.wait(a.id, 5))
    await asyncio.sleep(0.1)
    await store.transition(a.id, "running", ("queued",), TTL)
    await store.transition(a.id, "failed", ("running",), TTL, error="boom")
    got = await asyncio.wait_for(waiter, 2)
    assert got.status == "failed" and got.error == "boom"
    assert await store.wait("missing", 0.1) is None


async def test_images_and_ttl(queue):
    store = queue.store
    a, _ = await store.submit(job(n=2), None, 10, TTL)
    await store.store_images(a.id, [b"png0", b"png1"], 1)
    assert await store.fetch_image(a.id, 1) == b"png1"
    assert await store.fetch_image(a.id, 2) is None
    short, _ = await store.submit(job(), None, 10, 1)
    await asyncio.sleep(1.2)
    assert await store.get(short.id) is None and await store.fetch_image(a.id, 0) is None


async def test_webhook_attempts_keep_the_last_ones(queue):
    store = queue.store
    a, _ = await store.submit(job(webhook="http://example.com/h"), None, 10, TTL)
    for k in range(4):
        await store.record_webhook_attempt(a.id, {"attempt": k, "ok": k == 3}, 3)
    assert [x["attempt"] for x in (await store.get(a.id)).webhook_attempts] == [1, 2, 3]
    await store.record_webhook_attempt("missing", {"attempt": 0}, 3)  # a gone job: nothing to record on
    assert await store.get("missing") is None


async def test_redis_down_raises_unavailable(redis_prefix):
    from service.queue.redis import RedisBackend
    from service.testing import free_port

    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", redis_prefix)
    assert await backend.ping() is False
    with pytest.raises(QueueUnavailable):
        await backend.store.submit(job(), None, 10, TTL)
    with pytest.raises(QueueUnavailable):
        await backend.store.get("x")
    with pytest.raises(QueueUnavailable):
        await backend.stream.read([STREAM], "w1", 1, 0)
    with pytest.raises(QueueUnavailable):
        await backend.bus.workers()
    await backend.close()
