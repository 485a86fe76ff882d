"""Live job events: the queue's event streams (both backends) and GET /v1/jobs/{id}/events over real HTTP.

The app runs under uvicorn on loopback (real HTTP, real streaming); with Redis, two API replicas share one
redis-server: a client follows a job on one and resumes with Last-Event-ID on the other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn

from service import events
from service.api import create_app
from service.jobs import JobRecord, stream_name
from service.queue import QueueFull
from service.settings import ServiceSettings
from service.testing import BACKENDS, open_backend

pytest_plugins = ["service.testing"]
HAVE_REDIS = shutil.which("redis-server") is not None
STREAM = stream_name("tiny", "fp32")


# -- the store's events and the outbox ---------------------------------------------------------------------------------
@pytest_asyncio.fixture(params=BACKENDS)
async def queue(request: pytest.FixtureRequest):
    """A backend: the tests take its store and stream (outbox) roles."""
    backend = open_backend(request, events_maxlen=10)
    await backend.stream.ensure_streams([STREAM])
    yield backend
    await backend.close()


def job(**kw: object) -> JobRecord:
    return JobRecord(**{"model": "tiny", "precision": "fp32", "sampler": "ddim", "steps": 4, "n": 2, "seed": 1, **kw})


@pytest.mark.asyncio
async def test_state_changes_record_ordered_events_and_reads_block_until_one_arrives(queue):
    first, _ = await queue.store.submit(job(), None, 10, 60)
    second, _ = await queue.store.submit(job(), None, 10, 60)
    queued = await queue.store.read_events(second.id, None, 0)
    assert [(e.type, e.data["queue_position"]) for e in queued] == [("queued", 1)]
    await queue.store.transition(first.id, "running", ("queued",), 60, emit=events.started(first.id, 4))
    await queue.store.set_progress({first.id: (2, 4)})
    last = (await queue.store.read_events(first.id, None, 0))[-1].id
    reader = asyncio.create_task(queue.store.read_events(first.id, last, 3000))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await queue.store.transition(first.id, "succeeded", ("running",), 60, emit=events.succeeded(first.id, 2))
    woke = await reader
    assert time.monotonic() - t0 < 1.0 and [e.type for e in woke] == ["succeeded"]
    got = await queue.store.read_events(first.id, None, 0)
    assert [e.type for e in got] == ["queued", "running", "running", "succeeded"]
    assert [e.id for e in got] == sorted((e.id for e in got), key=events.id_key) and len({e.id for e in got}) == 4
    assert got[2].data["step"] == 2 and got[2].data["total"] == 4
    assert got[3].data["images"] == [f"/v1/jobs/{first.id}/images/{k}" for k in range(2)]
    assert await queue.store.read_events(first.id, got[1].id, 0) == got[2:]  # resume after an id: no repeats, no gaps
    assert await queue.store.read_events(first.id, got[3].id, 50) == []
    # A transition that does not apply (already terminal) records nothing.
    assert await queue.store.transition(first.id, "cancelled", ("queued", "running"), 60) is None
    assert len(await queue.store.read_events(first.id, None, 0)) == 4


@pytest.mark.asyncio
async def test_event_stream_is_bounded_and_webhook_tasks_follow_the_subscription(queue):
    hooked, _ = await queue.store.submit(job(webhook="http://example.com/h", webhook_events=["start", "completed"]),
                                   None, 10, 60)
    plain, _ = await queue.store.submit(job(), None, 10, 60)
    for j in (hooked, plain):
        await queue.store.transition(j.id, "running", ("queued",), 60, emit=events.started(j.id, 40))
        for step in range(1, 30):
            await queue.store.set_progress({j.id: (step, 40)})
        await queue.store.transition(j.id, "succeeded", ("running",), 60, emit=events.succeeded(j.id, 2))
    kept = await queue.store.read_events(hooked.id, None, 0)
    assert len(kept) == 10 and kept[-1].type == "succeeded"  # MAXLEN: the oldest progress went, the end stays
    tasks = await queue.stream.read_webhooks("d1", 10, 100, 60_000)
    assert [(t.job_id, t.hook) for t in tasks] == [(hooked.id, "start"), (hooked.id, "completed")]
    assert tasks[1].event_id == kept[-1].id
    assert await queue.stream.read_webhooks("d2", 10, 50, 60_000) == []  # pending with d1
    await queue.stream.ack_webhook(tasks[0])
    reclaimed = await queue.stream.read_webhooks("d2", 10, 50, 0)  # d1 "died": its unacked task is reclaimed
    assert reclaimed == [tasks[1]]
    for k in range(25):
        await queue.store.record_webhook_attempt(hooked.id, {"webhook_id": "w", "attempt": k, "ok": False}, 20)
    attempts = (await queue.store.get(hooked.id)).webhook_attempts
    assert [a["attempt"] for a in attempts] == list(range(5, 25))


# -- over HTTP ---------------------------------------------------------------------------------------------------
def make_settings(tiny_model_dir: Path, **overrides: object) -> ServiceSettings:
    base = {"models": [f"tiny={tiny_model_dir}"], "precisions": ["fp32"], "default_steps": 2, "max_n": 4,
            "block_ms": 100, "max_wait_ms": 5, "result_ttl_s": 120, "generate_timeout_s": 20, "heartbeat_ms": 200,
            "lease_ms": 5000, "progress_interval_ms": 0}
    return ServiceSettings(**{**base, **overrides})


@contextlib.contextmanager
def served(settings: ServiceSettings) -> Iterator[str]:
    """The app under uvicorn in a thread: real HTTP and real streaming (TestClient buffers whole responses)."""
    from service.testing import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def worker_less_replicas(backend: str, tiny_model_dir: Path,
                         request: pytest.FixtureRequest) -> Iterator[tuple[str, str, httpx.Client]]:
    """(url a, url b, client): two API replicas on one Redis (one app twice on the memory queue), no worker, so
    jobs stay queued."""
    shared: dict[str, object] = {"embedded_worker": False}
    if backend == "redis":
        shared |= {"redis_url": request.getfixturevalue("redis_server").url,
                   "redis_prefix": request.getfixturevalue("redis_prefix")}
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(served(make_settings(tiny_model_dir, **shared)))
        b = stack.enter_context(served(make_settings(tiny_model_dir, **shared))) if backend == "redis" else a
        yield a, b, stack.enter_context(httpx.Client(timeout=30))


def wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/readyz")
        if r.status_code == 200 and all(m["state"] == "ready" for m in r.json().get("models", {}).values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"never ready: {httpx.get(f'{url}/readyz').json()}")


def read_sse(lines: Iterator[str], stop_after: int | None = None) -> list[dict]:
    """Parse Server-Sent Events into {id, event, data}; until the server ends the stream (or `stop_after`)."""
    out: list[dict] = []
    current: dict = {}
    for line in lines:
        if line == "":
            if "data" in current:
                out.append({**current, "data": json.loads(current["data"])})
                if stop_after is not None and len(out) >= stop_after:
                    return out
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    return out


@pytest.fixture
def replicas(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Iterator[tuple[str, str]]:
    """(url A, url B): with Redis two API replicas (A runs the embedded worker); in memory one app twice."""
    if request.param == "memory":
        with served(make_settings(tiny_model_dir)) as url:
            wait_ready(url)
            yield url, url
        return
    shared = {"redis_url": request.getfixturevalue("redis_server").url,
              "redis_prefix": request.getfixturevalue("redis_prefix")}
    with served(make_settings(tiny_model_dir, embedded_worker=True, **shared)) as a, \
            served(make_settings(tiny_model_dir, embedded_worker=False, **shared)) as b:
        wait_ready(a)
        yield a, b


@pytest.mark.parametrize("replicas", BACKENDS, indirect=True)
def test_sse_queued_running_succeeded_and_resume_with_last_event_id(replicas):
    a, b = replicas
    with httpx.Client(timeout=30) as client:
        job_id = client.post(f"{a}/v1/jobs", json={"steps": 40, "n": 2, "seed": 5}).json()["id"]
        with client.stream("GET", f"{a}/v1/jobs/{job_id}/events") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            seen = read_sse(r.iter_lines())  # returns when the server ends the stream, after the terminal event
        types = [e["event"] for e in seen]
        assert types[0] == "queued" and seen[0]["data"]["queue_position"] == 0
        assert types[-1] == "succeeded" and set(types[1:-1]) == {"running"} and len(types) >= 4
        running = [e["data"] for e in seen if e["event"] == "running"]
        assert running[0] == {**running[0], "step": 0, "total": 40}
        assert [d["step"] for d in running] == sorted(d["step"] for d in running) and running[-1]["step"] > 0
        assert all(d["total"] == 40 for d in running)
        assert seen[-1]["data"]["images"] == [f"/v1/jobs/{job_id}/images/{k}" for k in range(2)]
        assert all(e["data"]["job_id"] == job_id for e in seen)
        assert client.get(f"{b}{seen[-1]['data']['images'][1]}").status_code == 200
        # Reconnect (on the other replica) after the second event: exactly the rest, same ids, same data.
        with client.stream("GET", f"{b}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": seen[1]["id"]}) as r:
            assert read_sse(r.iter_lines()) == seen[2:]
        # After the terminal event there is nothing left: 204 tells EventSource clients to stop reconnecting.
        done = client.get(f"{b}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": seen[-1]["id"]})
        assert done.status_code == 204
        assert client.get(f"{b}/v1/jobs/nope/events").status_code == 404


@pytest.mark.parametrize("backend", BACKENDS)
def test_sse_is_live_across_replicas_until_cancelled(backend, tiny_model_dir, request):
    """No worker: the job stays queued, the stream waits on a blocking read; a cancel through another replica (or
    the same app) arrives as the `cancelled` event and ends the stream."""
    with worker_less_replicas(backend, tiny_model_dir, request) as (a, b, client):
        client.post(f"{a}/v1/jobs", json={})
        job_id = client.post(f"{a}/v1/jobs", json={}).json()["id"]
        got: list[dict] = []
        with client.stream("GET", f"{a}/v1/jobs/{job_id}/events") as r:
            lines = r.iter_lines()
            got += read_sse(lines, stop_after=1)
            assert got[0]["event"] == "queued" and got[0]["data"]["queue_position"] == 1
            cancel_at = time.monotonic()
            threading.Timer(0.3, lambda: httpx.delete(f"{b}/v1/jobs/{job_id}")).start()
            got += read_sse(lines)
        assert [e["event"] for e in got] == ["queued", "cancelled"]
        assert 0.3 <= time.monotonic() - cancel_at < 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_sse_sends_the_waiting_jobs_position_as_the_jobs_ahead_leave_and_arrive(backend, tiny_model_dir, request):
    """No worker: a job third in line streams `queued` at position 2, then a `position` event (no id, so
    Last-Event-ID still names the stored event) each time that changes: 1 when a job ahead is cancelled through
    another replica, 2 when a higher-priority job arrives; its own cancel ends the stream."""
    with worker_less_replicas(backend, tiny_model_dir, request) as (a, b, client):
        ahead = [client.post(f"{a}/v1/jobs", json={}).json()["id"] for _ in range(2)]
        job_id = client.post(f"{a}/v1/jobs", json={}).json()["id"]
        with client.stream("GET", f"{a}/v1/jobs/{job_id}/events") as r:
            lines = r.iter_lines()
            [queued] = read_sse(lines, stop_after=1)
            assert queued["event"] == "queued" and queued["data"]["queue_position"] == 2
            assert client.delete(f"{b}/v1/jobs/{ahead[0]}").status_code == 200
            [moved] = read_sse(lines, stop_after=1)
            assert client.post(f"{b}/v1/jobs", json={"priority": 9}).status_code == 202
            [behind] = read_sse(lines, stop_after=1)
            assert client.delete(f"{b}/v1/jobs/{job_id}").status_code == 200
            rest = read_sse(lines)
        assert (moved["event"], moved["data"]["queue_position"], moved["data"]["job_id"]) == ("position", 1, job_id)
        assert (behind["event"], behind["data"]["queue_position"]) == ("position", 2)
        assert "id" not in moved and "id" not in behind and queued["id"]
        assert [e["event"] for e in rest] == ["cancelled"]
        assert client.get(f"{a}/v1/jobs/{job_id}").json()["status"] == "cancelled"


@pytest.mark.asyncio
async def test_queued_event_position_counts_higher_priorities_at_submission(queue):
    """Events x priorities: the submit script records the queued event with the priority-aware position (every
    waiting job of a higher priority, then the older ones of its own), never the whole depth."""
    normals = [(await queue.store.submit(job(), None, 10, 60))[0] for _ in range(3)]
    low, _ = await queue.store.submit(job(priority=1), None, 10, 60)
    high, _ = await queue.store.submit(job(priority=9), None, 10, 60)
    late, _ = await queue.store.submit(job(), None, 10, 60)

    async def queued_event(j: JobRecord) -> dict:
        [event] = await queue.store.read_events(j.id, None, 0)
        assert event.type == "queued"
        return event.data

    assert [(await queued_event(j))["queue_position"] for j in (*normals, low, high, late)] == [0, 1, 2, 3, 0, 4]
    assert [(await queued_event(j))["priority"] for j in (normals[0], low, high)] == [5, 1, 9]
    # The event keeps the position at submission; the live one moved as higher work arrived after the low job.
    assert await queue.store.position(low) == 5 and await queue.store.position(high) == 0
    # The depth limit still counts every class: a full queue refuses any priority, and records no event.
    with pytest.raises(QueueFull):
        await queue.store.submit(job(priority=9), None, 6, 60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sse_queued_event_of_a_high_priority_job_reports_its_priority_position(backend, tiny_model_dir, request):
    """No worker: two normal jobs wait; a high one submitted after them streams `queued` with priority 9 and
    position 0 (over HTTP, on another replica with Redis), GET agrees, and its cancel ends the stream."""
    with worker_less_replicas(backend, tiny_model_dir, request) as (a, b, client):
        normal = [client.post(f"{a}/v1/jobs", json={}).json() for _ in range(2)]
        assert [j["queue_position"] for j in normal] == [0, 1]
        created = client.post(f"{a}/v1/jobs", json={"priority": "high"})
        assert created.status_code == 202 and created.json()["queue_position"] == 0
        job_id = created.json()["id"]
        status = client.get(f"{b}/v1/jobs/{job_id}").json()
        assert status["priority"] == 9 and status["queue_position"] == 0
        assert client.get(f"{b}/v1/jobs/{normal[1]['id']}").json()["queue_position"] == 2  # behind the high one
        got: list[dict] = []
        with client.stream("GET", f"{b}/v1/jobs/{job_id}/events") as r:
            lines = r.iter_lines()
            got += read_sse(lines, stop_after=1)
            assert got[0]["event"] == "queued"
            assert got[0]["data"] == {**got[0]["data"], "job_id": job_id, "priority": 9, "queue_position": 0}
            threading.Timer(0.3, lambda: httpx.delete(f"{a}/v1/jobs/{job_id}")).start()
            got += read_sse(lines)
        assert [e["event"] for e in got] == ["queued", "cancelled"]
        # A normal job's queued event: the position at its submission, counted in its own class.
        with client.stream("GET", f"{b}/v1/jobs/{normal[1]['id']}/events") as r:
            first = read_sse(r.iter_lines(), stop_after=1)[0]
        assert first["data"]["priority"] == 5 and first["data"]["queue_position"] == 1


def test_generate_waits_on_events_not_polling(tiny_model_dir):
    """/v1/generate returns as soon as the terminal event lands (the wait blocks on the job's event stream)."""
    with served(make_settings(tiny_model_dir)) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/v1/generate", json={"seed": 4, "steps": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["seeds"] == [4]
        job = httpx.get(f"{url}/v1/jobs/{r.json()['id']}").json()
        assert job["status"] == "succeeded" and job["webhook"] is None and job["webhook_attempts"] == []


@pytest.mark.skipif(not HAVE_REDIS, reason="no redis-server")
def test_a_ptq4dm_worker_process_feeds_the_stream_and_the_webhook(tiny_model_dir, redis_server, redis_prefix):
    """Across processes: `ptq4dm worker` runs the job and delivers its webhook, an API-only replica streams it."""
    import os
    import subprocess
    import sys
    import tempfile

    from service.testing import WebhookReceiver, free_port

    secret = "events-test-secret"

    health = free_port()
    args = {"redis-url": redis_server.url, "redis-prefix": redis_prefix, "models": f"tiny={tiny_model_dir}",
            "precisions": "fp32", "worker-id": "wev", "health-port": health, "torch-threads": 1, "block-ms": 100,
            "heartbeat-ms": 200, "progress-interval-ms": 0, "webhook-secret": secret,
            "webhook-allow-loopback": "true"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="ptq4dm-ev-")}
    worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *(f"--{k}={v}" for k, v in args.items())],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    api = make_settings(tiny_model_dir, redis_url=redis_server.url, redis_prefix=redis_prefix, embedded_worker=False,
                        webhook_secret=secret, webhook_allow_loopback=True)
    try:
        with WebhookReceiver() as receiver, served(api) as url, httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 90
            while not _answers(f"http://127.0.0.1:{health}/readyz"):
                assert worker.poll() is None and time.monotonic() < deadline, "worker did not get ready"
                time.sleep(0.1)
            job_id = client.post(f"{url}/v1/jobs", json={"steps": 20, "webhook": receiver.url,
                                                         "webhook_events": ["completed", "failed"]}).json()["id"]
            with client.stream("GET", f"{url}/v1/jobs/{job_id}/events") as r:
                seen = read_sse(r.iter_lines())
            assert [seen[0]["event"], seen[1]["event"], seen[-1]["event"]] == ["queued", "running", "succeeded"]
            assert seen[1]["data"]["total"] == 20 and len(seen) >= 4
            deadline = time.monotonic() + 20
            while not receiver.calls:
                assert time.monotonic() < deadline, "no webhook"
                time.sleep(0.05)
            call = receiver.calls[0]
            assert json.loads(call["body"])["type"] == "job.completed"
            signed = f"{call['headers']['webhook-id']}.{call['headers']['webhook-timestamp']}.".encode() + call["body"]
            mac = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
            assert call["headers"]["webhook-signature"] == f"v1,{mac}"
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, out.decode(errors="replace")[-3000:]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
