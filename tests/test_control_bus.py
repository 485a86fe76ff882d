"""The ControlBus contract, run against both backends: registry, control channel, operations, locks."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from service.testing import BACKENDS, open_backend

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.asyncio
TTL = 60


@pytest_asyncio.fixture(params=BACKENDS)
async def bus(request: pytest.FixtureRequest):
    backend = open_backend(request)
    yield backend.bus
    await backend.close()


async def test_registry_expires_and_removes(bus):
    await bus.heartbeat("w1", {"id": "w1", "ready": True}, 0.5)
    await bus.heartbeat("w2", {"id": "w2", "ready": False}, 5)
    assert sorted(await bus.workers(), key=lambda w: w["id"]) == [{"id": "w1", "ready": True},
                                                                  {"id": "w2", "ready": False}]
    await bus.remove_worker("w2")
    assert await bus.workers() == [{"id": "w1", "ready": True}]
    await asyncio.sleep(0.6)
    assert await bus.workers() == []


async def test_control_is_broadcast_from_where_each_reader_started(bus):
    last, old = await bus.read_control(None, 0)
    assert old == []
    await bus.publish_control({"type": "requantize", "id": "op1"})
    late, _ = await bus.read_control(None, 0)  # started listening after op1: sees only what follows
    last, msgs = await bus.read_control(last, 100)
    assert msgs == [{"type": "requantize", "id": "op1"}]
    assert (await bus.read_control(last, 50))[1] == []
    reader = asyncio.create_task(bus.read_control(last, 2000))
    await asyncio.sleep(0.1)
    await bus.publish_control({"type": "requantize", "id": "op2"})
    assert (await asyncio.wait_for(reader, 1.5))[1] == [{"type": "requantize", "id": "op2"}]
    assert (await bus.read_control(late, 0))[1] == [{"type": "requantize", "id": "op2"}]


async def test_operations_merge_fields(bus):
    assert await bus.get_operation("op1") is None
    await bus.set_operation("op1", {"type": "requantize"}, TTL)
    await bus.set_operation("op1", {"worker:w1": {"state": "done"}}, TTL)
    assert await bus.get_operation("op1") == {"type": "requantize", "worker:w1": {"state": "done"}}


async def test_named_lock_has_one_owner_and_expires(bus):
    assert await bus.acquire_lock("calibrate:tiny:w8a8", "w1", 300)
    assert await bus.acquire_lock("calibrate:tiny:w8a8", "w1", 300)  # re-entrant for its owner
    assert not await bus.acquire_lock("calibrate:tiny:w8a8", "w2", 300)
    await bus.release_lock("calibrate:tiny:w8a8", "w2")  # not the owner: no effect
    assert not await bus.acquire_lock("calibrate:tiny:w8a8", "w2", 300)
    await bus.release_lock("calibrate:tiny:w8a8", "w1")
    assert await bus.acquire_lock("calibrate:tiny:w8a8", "w2", 300)
    await asyncio.sleep(0.4)  # the owner died: the lock lapses
    assert await bus.acquire_lock("calibrate:tiny:w8a8", "w3", 300)
