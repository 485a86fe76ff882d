"""The worker's loops under one task group: a stop ends every one of them, and a loop that crashes fails the worker
(run() raises) instead of dying unnoticed. Real tiny model, in-memory backend."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.jobs import JobRecord
from service.provider import ModelProvider
from service.queue import MemoryBackend
from service.settings import ServiceSettings
from service.worker import Worker

pytest_plugins = ["service.testing"]


def make_worker(tiny_model_dir: Path, tmp_path: Path) -> tuple[Worker, MemoryBackend]:
    settings = ServiceSettings(models=[f"tiny={tiny_model_dir}"], precisions=["fp32"], block_ms=100,
                               heartbeat_ms=100, max_wait_ms=0, calibration_cache_dir=str(tmp_path / "cache"))
    provider = ModelProvider(settings.model_paths, settings.precisions, settings.calibration_cache_dir)
    backend = MemoryBackend()
    return Worker(settings, backend, provider), backend


def loop_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("worker "))


def test_request_stop_ends_every_loop(tiny_model_dir, tmp_path):
    worker, backend = make_worker(tiny_model_dir, tmp_path)

    async def scenario() -> None:
        await worker.start()
        running = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        await worker.prepared()  # fp32 only: nothing to prepare, that loop is already over
        assert [name.split(": ")[1] for name in loop_tasks()] == ["batches", "control", "heartbeat", "webhooks"]
        job, _ = await backend.store.submit(JobRecord(model="tiny", precision="fp32", sampler="ddim", steps=2, n=1,
                                                      seed=1), None, 10, 60)
        assert (await backend.store.wait(job.id, 20)).status == "succeeded"
        assert [w["id"] for w in await backend.bus.workers()] == [worker.id]
        worker.request_stop()
        await asyncio.wait_for(running, 2)  # every loop noticed the stop within a block, none was cancelled
        assert worker.state == "stopped" and loop_tasks() == []
        assert await backend.bus.workers() == []

    asyncio.run(scenario())


def test_a_crashing_loop_stops_the_worker_and_surfaces(tiny_model_dir, tmp_path):
    worker, backend = make_worker(tiny_model_dir, tmp_path)

    async def scenario() -> None:
        await worker.start()
        running = asyncio.create_task(worker.run())
        # A malformed control message (no operation id): reporting its result crashes the batch loop.
        await backend.bus.publish_control({"type": "requantize", "model": "tiny", "precision": "w8a8"})
        with pytest.raises(KeyError):
            await asyncio.wait_for(running, 5)
        assert worker.state == "failed" and "batches loop crashed: KeyError" in worker.error
        assert loop_tasks() == [] and await backend.bus.workers() == []

    asyncio.run(scenario())
