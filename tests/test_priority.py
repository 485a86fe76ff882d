"""Priorities on the JobStore and WorkStream contracts, run against both backends (in-memory and a real redis-server).

Higher classes are read first, positions count them, a batch never exceeds its count across classes, and the aging
rule bounds how long a lower class waits: after K reads that passed it over, the next read serves it.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from service.jobs import JobRecord, stream_name
from service.priority import NORMAL, AgingCounter, class_stream, level, read_order
from service.queue import QueueFull
from service.testing import BACKENDS, job_record, open_backend

pytest_plugins = ["service.testing"]
STREAM = stream_name("tiny", "fp32")
TTL = 60
K = 2  # aging_batches in these tests


def job(priority: int = NORMAL, **kw: object) -> JobRecord:
    return job_record(priority=priority, **kw)


@pytest_asyncio.fixture(params=BACKENDS)
async def queue(request: pytest.FixtureRequest):
    """A backend: the tests take its store and stream roles."""
    backend = open_backend(request, aging_batches=K)
    await backend.stream.ensure_streams([STREAM])
    yield backend
    await backend.close()


async def submit(q, priority: int, **kw: object) -> JobRecord:  # noqa: ANN001
    return (await q.store.submit(job(priority, **kw), None, 100, TTL))[0]


@pytest.mark.asyncio
async def test_higher_priority_is_read_first_and_counted_ahead(queue):
    low = await submit(queue, 1)
    normal = [await submit(queue, NORMAL) for _ in range(3)]
    high = await submit(queue, 9)
    seven = await submit(queue, 7)
    assert await queue.store.depth(STREAM) == 6
    positions = [await queue.store.position(j) for j in (high, seven, *normal, low)]
    assert positions == [0, 1, 2, 3, 4, 5]
    got = await queue.stream.read([STREAM], "w1", 3, 100)
    assert [d.job_id for d in got] == [high.id, seven.id, normal[0].id]  # never more than count across classes
    assert got[0].stream == class_stream(STREAM, 9) and got[2].stream == STREAM
    assert await queue.store.position(await queue.store.get(low.id)) == 2
    rest = await queue.stream.read([STREAM], "w1", 10, 100)
    assert [d.job_id for d in rest] == [normal[1].id, normal[2].id, low.id]
    for d in got + rest:
        await queue.stream.ack(d)
    assert await queue.store.depth(STREAM) == 0


@pytest.mark.asyncio
async def test_low_job_is_served_after_at_most_k_high_batches(queue):
    low = await submit(queue, 1)
    highs = [await submit(queue, 9, seed=s) for s in range(8)]
    served = []
    for _ in range(K + 3):
        batch = await queue.stream.read([STREAM], "w1", 1, 100)
        served.append(batch[0].job_id)
        await queue.stream.ack(batch[0])
    assert served[:K] == [h.id for h in highs[:K]]  # K batches pass the low job over...
    assert served[K] == low.id  # ...then it is served, ahead of the remaining high ones
    assert served[K + 1:] == [h.id for h in highs[K:K + 2]]  # and strict priority resumes
    # The streak is per consumer: a fresh consumer starts strict.
    await submit(queue, 1)
    assert (await queue.stream.read([STREAM], "w2", 1, 100))[0].job_id == highs[K + 2].id


@pytest.mark.asyncio
async def test_aging_takes_the_longest_waiting_lower_class(queue):
    old_low = await submit(queue, 1)
    await submit(queue, NORMAL)
    for s in range(K):
        await submit(queue, 9, seed=s)
    for _ in range(K):
        await queue.stream.read([STREAM], "w1", 1, 100)
    aged = await queue.stream.read([STREAM], "w1", 1, 100)
    assert [d.job_id for d in aged] == [old_low.id]  # older than the normal one, though of a lower class


@pytest.mark.asyncio
async def test_a_read_that_reaches_the_lower_class_resets_the_streak(queue):
    for s in range(K):
        await submit(queue, 9, seed=s)
    low = await submit(queue, 1)
    await queue.stream.read([STREAM], "w1", 1, 100)  # passed over: streak 1
    both = await queue.stream.read([STREAM], "w1", 5, 100)  # took everything: nothing passed over
    assert [d.job_id for d in both][-1] == low.id
    newer = [await submit(queue, 9, seed=s) for s in range(K)]
    await submit(queue, 1)
    assert [(await queue.stream.read([STREAM], "w1", 1, 100))[0].job_id for _ in range(K)] == [j.id for j in newer]


@pytest.mark.asyncio
async def test_cancel_reclaim_and_blocking_read_in_a_priority_class(queue):
    high = await submit(queue, 9)
    other = await submit(queue, 8)
    assert (await queue.store.cancel(high.id, TTL)).status == "cancelled"
    assert await queue.store.depth(STREAM) == 1 and await queue.store.position(await queue.store.get(other.id)) == 0
    held = await queue.stream.read([STREAM], "dead", 1, 100)
    assert [d.job_id for d in held] == [other.id]
    await asyncio.sleep(0.25)
    claimed = await queue.stream.reclaim(STREAM, "rescuer", 200, 10)
    assert [(d.job_id, d.stream) for d in claimed] == [(other.id, class_stream(STREAM, 8))]
    await queue.stream.ack(claimed[0])
    reader = asyncio.create_task(queue.stream.read([STREAM], "w1", 4, 3000))
    await asyncio.sleep(0.2)
    late = await submit(queue, 9)
    got = await asyncio.wait_for(reader, 2)
    assert [d.job_id for d in got] == [late.id]


@pytest.mark.asyncio
async def test_queue_full_counts_every_class(queue):
    await queue.store.submit(job(9), None, 2, TTL)
    await queue.store.submit(job(1), None, 2, TTL)
    with pytest.raises(QueueFull):
        await queue.store.submit(job(NORMAL), None, 2, TTL)


def test_levels_and_read_order():
    assert [level(v) for v in (None, "low", "normal", "high", 0, 7)] == [5, 1, 5, 9, 0, 7]
    classes = [("a#p9", 9), ("a", 5), ("a#p1", 1)]
    heads = {"a#p9": (5, 0), "a": (3, 0), "a#p1": (1, 0)}
    assert read_order(classes, heads, aging=False) == ["a#p9", "a", "a#p1"]
    assert read_order(classes, heads, aging=True) == ["a#p1", "a#p9", "a"]
    assert read_order(classes, {"a#p1": (1, 0)}, aging=True) == ["a#p9", "a", "a#p1"]  # nothing above it waits
    counter = AgingCounter(2)
    for passed in (True, True):
        assert not counter.due("w")
        counter.record("w", aged=False, passed=passed)
    assert counter.due("w")
    counter.record("w", aged=True, passed=True)
    assert not counter.due("w")
