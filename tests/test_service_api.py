"""End-to-end through HTTP (the ASGI app with its lifespan): embedded in-memory mode and Redis mode.

Real sampling on the tiny UNet, real PNGs decoded with Pillow, a real redis-server for the Redis parameter.
"""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from service.api import create_app
from service.settings import ServiceSettings

pytest_plugins = ["service.testing"]
HAVE_REDIS = shutil.which("redis-server") is not None
BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.skipif(not HAVE_REDIS, reason="no redis-server"))]


def make_settings(tiny_model_dir: Path, **overrides: object) -> ServiceSettings:
    base = {"models": [f"tiny={tiny_model_dir}"], "precisions": ["fp32"], "default_steps": 2, "max_n": 4,
            "max_steps": 1000, "block_ms": 100, "max_wait_ms": 20, "result_ttl_s": 120, "generate_timeout_s": 20,
            "heartbeat_ms": 200, "lease_ms": 5000}
    return ServiceSettings(**{**base, **overrides})


@pytest.fixture
def backend_settings(request: pytest.FixtureRequest, tiny_model_dir: Path) -> dict:
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return {"redis_url": server.url, "redis_prefix": request.getfixturevalue("redis_prefix"),
                "embedded_worker": True}
    return {}


def client_for(settings: ServiceSettings) -> TestClient:
    return TestClient(create_app(settings), raise_server_exceptions=True)


def wait_ready(client: TestClient, timeout_s: float = 60, all_models: bool = True) -> None:
    """/readyz 200 (some variant serves) and, with all_models, every variant ready (quantized ones calibrate and
    compile after fp32 is serving)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = client.get("/readyz")
        body = ready.json()
        if "error" in body:  # the worker failed to start: it will not become ready
            raise AssertionError(f"worker failed: {body}")
        states = {k: v["state"] for k, v in body.get("models", {}).items()}
        if all_models and "failed" in states.values():
            raise AssertionError(f"a variant failed: {body}")
        api_only = "worker" not in body.get("checks", {})  # its models' states come from workers' heartbeats
        if ready.status_code == 200 and (not all_models or api_only or set(states.values()) <= {"ready"}):
            return
        time.sleep(0.05)
    raise AssertionError(f"never ready: {client.get('/readyz').json()}")


def wait_status(client: TestClient, job_id: str, statuses: set[str], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stuck: {client.get(f'/v1/jobs/{job_id}').json()}")


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def decode(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image)


def offline(tiny_model_dir: Path, seeds: list[int], sampler: str = "ddim", steps: int = 2, eta: float = 0.0):
    model = load_model(tiny_model_dir)
    return to_uint8(sample(model.unet, model.scheduler_config, seeds, sampler=sampler, steps=steps, eta=eta))


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_submit_poll_fetch_png_matches_offline_sampling(tiny_model_dir, backend_settings):
    with client_for(make_settings(tiny_model_dir, **backend_settings)) as client:
        assert client.get("/livez").status_code == 200
        wait_ready(client)
        r = client.post("/v1/jobs", json={"n": 3, "seed": 10, "steps": 3, "sampler": "ddim", "eta": 0.5})
        assert r.status_code == 202, r.text
        created = r.json()
        assert created["status"] == "queued" and r.headers["location"] == f"/v1/jobs/{created['id']}"
        job = wait_status(client, created["id"], {"succeeded", "failed"})
        assert job["status"] == "succeeded", job
        assert job["seeds"] == [10, 11, 12] and job["progress"] == {"step": 3, "total": 3}
        t = job["timings"]
        assert 0 < t["compute_s"] <= t["finished_at"] - t["created_at"]
        assert job["model_version"] and job["timings"]["run_s"] >= 0 and job["timings"]["wait_s"] >= 0
        assert job["images"] == [f"/v1/jobs/{created['id']}/images/{k}" for k in range(3)]
        images = []
        for url in job["images"]:
            png = client.get(url)
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            images.append(decode(png.content))
        assert all(img.shape == (16, 16) and img.dtype == np.uint8 for img in images)
        expected = offline(tiny_model_dir, [10, 11, 12], steps=3, eta=0.5)[..., 0]
        assert np.abs(np.stack(images).astype(int) - expected.astype(int)).max() <= 1
        assert client.get(f"/v1/jobs/{created['id']}/images/3").status_code == 404
        assert client.get("/v1/jobs/does-not-exist").status_code == 404


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_same_seed_same_png_whatever_the_batch(tiny_model_dir, backend_settings):
    settings = make_settings(tiny_model_dir, max_batch_images=2, max_wait_ms=200, **backend_settings)
    with client_for(settings) as client:
        wait_ready(client)
        alone = client.post("/v1/generate", json={"n": 1, "seed": 42}).json()
        ids = [client.post("/v1/jobs", json={"n": n, "seed": seed}).json()["id"] for n, seed in ((2, 41), (1, 7))]
        jobs = [wait_status(client, i, {"succeeded"}) for i in ids]
        batched = decode(client.get(jobs[0]["images"][1]).content)  # seed 41 + 1 = 42, in a shared batch
        single = decode(base64.b64decode(alone["images_png_base64"][0]))
        assert alone["seeds"] == [42] and jobs[0]["seeds"] == [41, 42]
        assert np.abs(batched.astype(int) - single.astype(int)).max() <= 1


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_generate_sync_png_json_and_timeout(tiny_model_dir, backend_settings):
    with client_for(make_settings(tiny_model_dir, **backend_settings)) as client:
        wait_ready(client)
        r = client.post("/v1/generate", json={"seed": 3}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "3"
        assert decode(r.content).shape == (16, 16)
        r = client.post("/v1/generate", json={"n": 2})
        body = r.json()
        assert r.status_code == 200 and len(body["images_png_base64"]) == 2 and len(body["seeds"]) == 2
        assert body["seeds"][1] == body["seeds"][0] + 1  # the chosen seed is returned
        slow = client.post("/v1/generate", json={"steps": 1000, "timeout_s": 0.05})
        assert slow.status_code == 202 and slow.json()["id"]
        assert client.delete(f"/v1/jobs/{slow.json()['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_cancel_running_stops_between_steps_and_worker_moves_on(tiny_model_dir, backend_settings):
    with client_for(make_settings(tiny_model_dir, **backend_settings)) as client:
        wait_ready(client)
        long_id = client.post("/v1/jobs", json={"steps": 1000}).json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/v1/jobs/{long_id}").json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.delete(f"/v1/jobs/{long_id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        after = client.post("/v1/jobs", json={"seed": 1}).json()["id"]
        assert wait_status(client, after, {"succeeded"}, timeout_s=30)["status"] == "succeeded"
        cancelled = client.get(f"/v1/jobs/{long_id}").json()
        assert cancelled["status"] == "cancelled" and cancelled["progress"]["step"] < 1000
        assert client.get(f"/v1/jobs/{long_id}/images/0").status_code == 409
        assert client.delete(f"/v1/jobs/{after}").status_code == 409  # already succeeded


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_queue_full_429_cancel_queued_and_idempotency(tiny_model_dir, backend_settings):
    backend_settings = {**backend_settings, "embedded_worker": False}  # nothing consumes: the queue fills up
    with client_for(make_settings(tiny_model_dir, max_queue=2, **backend_settings)) as client:
        first = client.post("/v1/jobs", json={"seed": 1}, headers={"Idempotency-Key": "abc"})
        again = client.post("/v1/jobs", json={"seed": 1}, headers={"Idempotency-Key": "abc"})
        assert first.status_code == again.status_code == 202 and again.json()["id"] == first.json()["id"]
        conflict = client.post("/v1/jobs", json={"seed": 2}, headers={"Idempotency-Key": "abc"})
        assert conflict.status_code == 409
        second = client.post("/v1/jobs", json={}).json()
        assert second["queue_position"] == 1
        full = client.post("/v1/jobs", json={})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert client.delete(f"/v1/jobs/{first.json()['id']}").json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{second['id']}").json()["queue_position"] == 0
        assert client.post("/v1/jobs", json={}).status_code == 202  # room again
        assert client.delete("/v1/jobs/unknown").status_code == 404
        metrics = client.get("/metrics").text
        assert 'ptq4dm_jobs_rejected_total{reason="queue_full"} 1.0' in metrics
        assert "ptq4dm_queue_depth" in metrics and "ptq4dm_jobs_submitted_total 3.0" in metrics


@pytest.mark.parametrize(("body", "field"), [
    ({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"n": 0}, "n"), ({"n": 5}, "n"),
    ({"sampler": "euler"}, "sampler"), ({"eta": 1.5}, "eta"), ({"sampler": "ddpm", "eta": 0.3}, "eta"),
    ({"seed": -1}, "seed"), ({"precision": "w8a8"}, "precision"), ({"model": "sd15"}, "model"),
    ({"colour": "red"}, "colour"), ({"steps": "many"}, "steps"),
])
def test_validation_errors_name_the_field(tiny_model_dir, body, field):
    with client_for(make_settings(tiny_model_dir, embedded_worker=False)) as client:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        assert any(err["loc"][-1] == field for err in r.json()["detail"]), r.json()
        if field in ("precision", "model"):
            assert "served" in r.json()["detail"][0]["msg"]


def test_failed_job_reports_the_error(tiny_model_dir):
    """steps beyond the model's T pass the API bound but the worker refuses them with a clear error."""
    with client_for(make_settings(tiny_model_dir, max_steps=5000)) as client:
        wait_ready(client)
        r = client.post("/v1/generate", json={"steps": 2000})
        assert r.status_code == 500 and "steps" in r.json()["detail"]
        job = client.get(f"/v1/jobs/{r.json()['id']}").json()
        assert job["status"] == "failed" and "steps" in job["error"]
        assert 'ptq4dm_job_failures_total{reason="invalid"} 1.0' in client.get("/metrics").text


def test_probes_and_openapi(tiny_model_dir):
    with client_for(make_settings(tiny_model_dir)) as client:
        assert client.get("/livez").json() == {"status": "alive"}
        wait_ready(client)
        assert client.get("/startupz").status_code == 200
        assert client.get("/readyz").json()["checks"] == {"queue": True, "accepting": True, "worker": True}
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images/{k}", "/v1/generate"} <= set(paths)
        client.post("/v1/generate", json={"n": 2})
        text = client.get("/metrics").text
        assert "ptq4dm_images_generated_total 2.0" in text and "ptq4dm_job_run_seconds_count 1.0" in text
        assert "ptq4dm_batch_images_count" in text and "ptq4dm_workers_ready 1.0" in text


def test_embedded_worker_with_missing_model_is_live_but_not_ready(tmp_path):
    settings = ServiceSettings(models=[f"ghost={tmp_path}"], precisions=["fp32"])
    with client_for(settings) as client:
        assert client.get("/livez").status_code == 200
        deadline = time.monotonic() + 10
        while client.get("/startupz").json()["state"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "model" in ready.json()["error"]
