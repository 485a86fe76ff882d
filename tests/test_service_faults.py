"""Fault tests with real components: redis-server (AOF) stopped and restarted, worker processes SIGKILLed/SIGTERMed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_service_api import client_for, make_settings, wait_ready, wait_status, wait_until

from service.jobs import stream_name

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def aof_redis(tmp_path: Path):
    """A private server with AOF (fsync always): a restart keeps streams, groups and job hashes."""
    from service.testing import RedisServer

    server = RedisServer(tmp_path / "redis", appendonly=True)
    with server:
        yield server


def test_redis_outage_gives_503_then_recovers_and_queued_jobs_survive(tiny_model_dir, aof_redis, redis_prefix):
    api = make_settings(tiny_model_dir, redis_url=aof_redis.url, redis_prefix=redis_prefix)  # no worker
    with client_for(api) as client:
        wait_ready(client)
        queued = client.post("/v1/jobs", json={"seed": 5}).json()["id"]
        aof_redis.stop()
        r = client.post("/v1/jobs", json={"seed": 6})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert client.get(f"/v1/jobs/{queued}").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert client.get("/livez").status_code == 200
        assert client.get("/metrics").status_code == 200
        aof_redis.start()
        assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=10)
        assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
        second = client.post("/v1/jobs", json={"seed": 6})
        assert second.status_code == 202
    worker = make_settings(tiny_model_dir, redis_url=aof_redis.url, redis_prefix=redis_prefix, embedded_worker=True)
    with client_for(worker) as client:  # a worker started after the outage drains what survived it
        for job_id in (queued, second.json()["id"]):
            assert wait_status(client, job_id, {"succeeded", "failed"})["status"] == "succeeded"


def test_embedded_worker_rides_out_a_redis_restart(tiny_model_dir, aof_redis, redis_prefix):
    settings = make_settings(tiny_model_dir, redis_url=aof_redis.url, redis_prefix=redis_prefix,
                             embedded_worker=True)
    with client_for(settings) as client:
        wait_ready(client)
        before = client.post("/v1/generate", json={"seed": 1}).json()
        aof_redis.stop()
        time.sleep(0.5)
        assert client.post("/v1/jobs", json={}).status_code == 503
        aof_redis.start()
        assert wait_until(lambda: client.get("/readyz").status_code == 200, timeout_s=15)
        after = client.post("/v1/generate", json={"seed": 1}).json()
        assert before["status"] == after["status"] == "succeeded"
        assert after["images_png_base64"] == before["images_png_base64"]


def test_dead_letter_after_max_deliveries(tiny_model_dir, redis_server, redis_prefix):
    """A job whose holders keep dying (stand-in: a consumer that takes it and never acks) is failed, not looped."""
    import asyncio

    from service.queue.redis import RedisBackend

    settings = make_settings(tiny_model_dir, redis_url=redis_server.url, redis_prefix=redis_prefix,
                             lease_ms=300, max_deliveries=2, embedded_worker=False)
    with client_for(settings) as client:
        job_id = client.post("/v1/jobs", json={}).json()["id"]

        async def crash_twice() -> None:
            q = RedisBackend(redis_server.url, redis_prefix)
            stream = stream_name("tiny", "fp32")
            deliveries = await q.stream.read([stream], "doomed-1", 1, 100)
            for attempt in (1, 2):  # delivered, started, then the worker "died" (no ack, lease not renewed)
                await q.store.transition(job_id, "running", ("queued", "running"), 60, attempts=attempt)
                await asyncio.sleep(0.4)
                if attempt == 1:
                    deliveries = await q.stream.reclaim(stream, "doomed-2", 300, 1)
            assert [d.job_id for d in deliveries] == [job_id]
            await q.close()

        asyncio.run(crash_twice())
    with client_for(settings.model_copy(update={"embedded_worker": True})) as client:
        job = wait_status(client, job_id, {"failed", "succeeded"}, timeout_s=30)
        assert job["status"] == "failed" and "dead-letter" in job["error"] and job["attempts"] == 3
        assert client.get("/metrics").text.count('ptq4dm_job_failures_total{reason="dead_letter"} 1.0') == 1


class WorkerProcess:
    """`ptq4dm worker` as a real subprocess with its own probe port."""

    def __init__(self, tiny_model_dir: Path, redis_url: str, prefix: str, worker_id: str, **settings: object) -> None:
        from service.testing import free_port

        self.id = worker_id
        self.port = free_port()
        args = {"redis-url": redis_url, "redis-prefix": prefix, "models": f"tiny={tiny_model_dir}",
                "precisions": "fp32", "worker-id": worker_id, "health-port": self.port, "torch-threads": 1,
                "lease-ms": 1500, "heartbeat-ms": 200, "block-ms": 100, "max-wait-ms": 5, **settings}
        cmd = [sys.executable, "-m", "service.cli", "worker"] + [f"--{k}={v}" for k, v in args.items()]
        # Its own compile cache: a worker killed mid-compile leaves a truncated kernel there, not in the suite's.
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="ptq4dm-killable-inductor-")}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 90) -> None:
        if not wait_until(lambda: self.ready() or self.proc.poll() is not None, timeout_s, interval_s=0.1):
            raise AssertionError(f"worker {self.id} not ready")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.communicate(timeout=10)[0].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_sigkill_mid_job_is_reclaimed_and_sigterm_drains(tiny_model_dir, redis_server, redis_prefix):
    workers = [WorkerProcess(tiny_model_dir, redis_server.url, redis_prefix, f"w{i}") for i in (1, 2)]
    try:
        settings = make_settings(tiny_model_dir, redis_url=redis_server.url, redis_prefix=redis_prefix,
                                 admin_token="t")
        with client_for(settings) as client:
            for w in workers:
                w.wait_ready()
            listed = client.get("/admin/workers", headers={"Authorization": "Bearer t"}).json()
            assert sorted(w["id"] for w in listed) == ["w1", "w2"]
            long_id = client.post("/v1/jobs", json={"steps": 400, "seed": 9}).json()["id"]
            short = [client.post("/v1/jobs", json={"seed": s, "n": 2}).json()["id"] for s in range(6)]
            deadline = time.monotonic() + 60
            while (job := client.get(f"/v1/jobs/{long_id}").json())["progress"]["step"] < 3:
                assert time.monotonic() < deadline and job["status"] in ("queued", "running"), job
                time.sleep(0.01)
            victim = next(w for w in workers if w.id == job["worker"])
            survivor = next(w for w in workers if w is not victim)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            finished = [wait_status(client, i, {"succeeded", "failed", "cancelled"}, timeout_s=90)
                        for i in [long_id, *short]]
            assert [j["status"] for j in finished] == ["succeeded"] * 7
            assert finished[0]["worker"] == survivor.id and finished[0]["attempts"] == 2
            # SIGTERM mid-job: the job in hand is finished and acked, then the process exits 0.
            last = client.post("/v1/jobs", json={"steps": 200}).json()["id"]
            assert wait_until(lambda: client.get(f"/v1/jobs/{last}").json()["progress"]["step"] >= 2, 30)
            survivor.proc.send_signal(signal.SIGTERM)
            assert survivor.proc.wait(30) == 0, survivor.output()
            assert client.get(f"/v1/jobs/{last}").json()["status"] == "succeeded"
            assert client.get("/admin/workers", headers={"Authorization": "Bearer t"}).json() == []
    finally:
        for w in workers:
            w.stop()
