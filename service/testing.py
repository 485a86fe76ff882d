"""Test and benchmark helpers: a real redis-server on a free loopback port, a tiny model on disk, a webhook receiver.

Loaded by the service tests as a pytest plugin (`pytest_plugins = ["service.testing"]`), so the session-scoped
Redis is started once for the whole run. Nothing here is imported by the running service.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.jobs import JobRecord
from service.queue import MemoryBackend, QueueBackend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server (optionally with AOF, so a restart keeps the queue) in its own directory."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--protected-mode", "no", "--loglevel", "warning"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self._answers():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


# The params of a fixture that runs a contract test on both backends (see `open_backend`).
BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.skipif(not have_redis(), reason="no redis-server"))]


def job_record(**fields: object) -> JobRecord:
    """A small job for the queue contract tests (model 'tiny', fp32, DDIM-2, one image, seed 7), fields overridden."""
    return JobRecord(**{"model": "tiny", "precision": "fp32", "sampler": "ddim", "steps": 2, "n": 1, "seed": 7,
                        **fields})


def open_backend(request: pytest.FixtureRequest, **options: int) -> QueueBackend:
    """The backend a fixture parametrised with BACKENDS asks for: in-memory, or Redis on the session's server under a
    fresh key prefix. `options`: events_maxlen, aging_batches."""
    if request.param == "memory":
        return MemoryBackend(**options)
    from service.queue.redis import RedisBackend

    return RedisBackend(request.getfixturevalue("redis_server").url, request.getfixturevalue("redis_prefix"),
                        **options)


class WebhookReceiver:
    """A webhook receiver on a loopback port that answers the scripted statuses in turn (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.calls: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                                       "at": time.time()})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ptq4dm"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session; tests isolate themselves with a fresh key prefix (see `redis_prefix`)."""
    if not have_redis():
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    with server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_unet: object, scheduler_config: dict) -> Path:
    """The conftest's tiny random UNet saved in diffusers layout (16x16, one channel): fast real sampling."""
    from diffusers import DDPMScheduler

    path = tmp_path_factory.mktemp("tiny-model")
    tiny_unet.save_pretrained(path / "unet")
    DDPMScheduler(**scheduler_config).save_config(path / "scheduler")
    return path
