"""Priorities through HTTP: the admin-token gate, positions, and a real `ptq4dm serve` + `ptq4dm worker` over Redis
serving a high-priority job before twenty normal ones queued ahead of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_service_api import client_for, make_settings, wait_until
from test_service_faults import REPO, WorkerProcess

from service.testing import free_port

pytest_plugins = ["service.testing"]
NO_REDIS = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
ADMIN = {"Authorization": "Bearer t0ken"}


def test_priority_above_normal_needs_the_admin_token_when_the_setting_is_on(tiny_model_dir):
    settings = make_settings(tiny_model_dir, embedded_worker=False, admin_token="t0ken",
                             high_priority_requires_token=True)
    with client_for(settings) as client:
        for priority in ("high", 6, 9):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = client.post("/v1/jobs", json={"priority": priority}, headers=headers)
                assert r.status_code == 403, r.text
                assert r.json()["detail"][0]["loc"] == ["body", "priority"]
            assert client.post("/v1/generate", json={"priority": priority}).status_code == 403
        normal = client.post("/v1/jobs", json={"priority": "normal"}).json()
        low = client.post("/v1/jobs", json={"priority": "low"}).json()
        five = client.post("/v1/jobs", json={"priority": 5}).json()
        high = client.post("/v1/jobs", json={"priority": "high"}, headers=ADMIN)
        assert high.status_code == 202 and high.json()["queue_position"] == 0
        jobs = {name: client.get(f"/v1/jobs/{j['id']}").json() for name, j in
                (("normal", normal), ("low", low), ("five", five), ("high", high.json()))}
        assert {k: (j["priority"], j["queue_position"]) for k, j in jobs.items()} == {
            "high": (9, 0), "normal": (5, 1), "five": (5, 2), "low": (1, 3)}
        for bad in ("urgent", 10, -1, True, "9"):
            r = client.post("/v1/jobs", json={"priority": bad})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "priority", r.text
    with client_for(make_settings(tiny_model_dir, embedded_worker=False)) as client:  # the setting is off by default
        assert client.post("/v1/jobs", json={"priority": "high"}).status_code == 202


class ServeProcess:
    """`ptq4dm serve` as a real subprocess on its own port (API only with a redis-url, else embedded)."""

    def __init__(self, tiny_model_dir: Path, **settings: object) -> None:
        self.port = free_port()
        args = {"models": f"tiny={tiny_model_dir}", "precisions": "fp32", "port": self.port, "default-steps": 2,
                "max-queue": 64, "torch-threads": 1, **settings}
        cmd = [sys.executable, "-m", "service.cli", "serve"] + [f"--{k}={v}" for k, v in args.items()]
        # A file, not a pipe: an unread pipe fills up with access logs and then blocks the server.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the process)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return self.proc.poll() is not None

        assert wait_until(ready, timeout_s, interval_s=0.1) and self.proc.poll() is None, self.output()

    def output(self) -> str:
        self.stop()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@NO_REDIS
def test_high_priority_job_starts_before_twenty_normal_ones_queued_ahead(tiny_model_dir, redis_server, redis_prefix):
    api = ServeProcess(tiny_model_dir, **{"redis-url": redis_server.url, "redis-prefix": redis_prefix})
    worker = None
    try:
        api.wait_ready()
        with httpx.Client(base_url=api.url, timeout=10) as http:
            normal = [http.post("/v1/jobs", json={"seed": s}).json()["id"] for s in range(20)]
            created = http.post("/v1/jobs", json={"seed": 99, "priority": "high"})
            assert created.status_code == 202 and created.json()["queue_position"] == 0, created.text
            high = created.json()["id"]
            assert http.get(f"/v1/jobs/{normal[0]}").json()["queue_position"] == 1  # the high job is ahead
            worker = WorkerProcess(tiny_model_dir, redis_server.url, redis_prefix, "w-prio", **{"max-batch": 4})
            deadline = time.monotonic() + 90
            while True:
                jobs = {i: http.get(f"/v1/jobs/{i}").json() for i in [high, *normal]}
                if all(j["status"] == "succeeded" for j in jobs.values()):
                    break
                assert all(j["status"] in ("queued", "running", "succeeded") for j in jobs.values()), jobs
                assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()
                time.sleep(0.1)
        started = sorted(jobs, key=lambda i: jobs[i]["timings"]["started_at"])
        assert started[0] == high
        assert jobs[high]["timings"]["started_at"] < min(jobs[i]["timings"]["started_at"] for i in normal)
        assert started[1:] == normal  # the normal ones in their own FIFO order
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
