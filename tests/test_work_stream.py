"""The WorkStream contract, run against both backends: deliveries, leases and the webhook outbox.

Jobs enter through JobStore.submit (the only producer); priorities are tests/test_priority.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio

from service import events
from service.jobs import stream_name
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
    await backend.stream.ensure_streams([STREAM])  # idempotent
    yield backend
    await backend.close()


async def test_read_respects_count_and_fifo_then_ack(queue):
    stream = queue.stream
    jobs = [(await queue.store.submit(job(seed=s), None, 10, TTL))[0] for s in range(3)]
    first = await stream.read([STREAM], "w1", 2, 100)
    assert [d.job_id for d in first] == [jobs[0].id, jobs[1].id]
    rest = await stream.read([STREAM], "w1", 5, 100)
    assert [d.job_id for d in rest] == [jobs[2].id]
    for d in first + rest:
        await stream.ack(d)
    assert await stream.read([STREAM], "w1", 5, 50) == []
    assert await stream.reclaim(STREAM, "w2", 0, 10) == []  # acked entries are gone for good


async def test_read_blocks_until_a_job_arrives(queue):
    reader = asyncio.create_task(queue.stream.read([STREAM], "w1", 4, 2000))
    await asyncio.sleep(0.1)
    submitted, _ = await queue.store.submit(job(), None, 10, TTL)
    t0 = time.monotonic()
    got = await reader
    assert [d.job_id for d in got] == [submitted.id] and time.monotonic() - t0 < 1.5


async def test_reclaim_after_idle_and_renew_keeps_the_lease(queue):
    stream = queue.stream
    a, _ = await queue.store.submit(job(), None, 10, TTL)
    b, _ = await queue.store.submit(job(), None, 10, TTL)
    held = await stream.read([STREAM], "dead", 1, 50)
    renewed = await stream.read([STREAM], "alive", 1, 50)
    await asyncio.sleep(0.3)
    await stream.renew(renewed, "alive")
    claimed = await stream.reclaim(STREAM, "rescuer", 200, 10)
    assert [d.job_id for d in claimed] == [held[0].job_id] == [a.id]
    assert await stream.reclaim(STREAM, "other", 200, 10) == []  # the rescuer now holds it, freshly
    await stream.ack(claimed[0])
    await stream.ack(renewed[0])
    assert b.id == renewed[0].job_id


async def test_outbox_lease_is_renewed_until_acked(queue):
    stream = queue.stream
    a, _ = await queue.store.submit(job(webhook="http://example.com/h", webhook_events=["completed"]), None, 10, TTL)
    assert await stream.read_webhooks("d1", 10, 0, 60_000) == []  # nothing subscribed happened yet
    await queue.store.transition(a.id, "running", ("queued",), TTL)
    await queue.store.transition(a.id, "succeeded", ("running",), TTL, emit=events.succeeded(a.id, 1))
    [task] = await stream.read_webhooks("d1", 10, 100, 60_000)
    assert (task.job_id, task.hook) == (a.id, "completed")
    await asyncio.sleep(0.3)
    await stream.renew_webhooks([task], "d1")  # still retrying: not reclaimed
    assert await stream.read_webhooks("d2", 10, 0, 200) == []
    await stream.ack_webhook(task)
    await asyncio.sleep(0.3)
    assert await stream.read_webhooks("d2", 10, 0, 200) == []  # acked: gone for good
