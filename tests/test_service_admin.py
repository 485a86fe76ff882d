"""Admin routes through HTTP: auth (404 without a token, 401 wrong token), workers/models, re-quantize under load."""

from __future__ import annotations

import shutil
import time

import pytest
from test_service_api import client_for, make_settings, wait_ready, wait_status

pytest_plugins = ["service.testing"]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_REDIS = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def wait_operation(client, op_id: str, n_workers: int = 1, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        op = client.get(f"/admin/operations/{op_id}", headers=AUTH).json()
        if len(op["workers"]) >= n_workers:
            return op
        time.sleep(0.05)
    raise AssertionError(f"operation {op_id} not applied: {op}")


def test_admin_routes_absent_without_token(tiny_model_dir):
    with client_for(make_settings(tiny_model_dir, embedded_worker=False)) as client:
        for method, path in (("get", "/admin/workers"), ("get", "/admin/models"), ("post", "/admin/requantize")):
            assert getattr(client, method)(path, headers=AUTH).status_code == 404
        assert "/admin/workers" in client.get("/openapi.json").json()["paths"]


def test_admin_auth_and_listing(tiny_model_dir):
    with client_for(make_settings(tiny_model_dir, admin_token=TOKEN, worker_id="embedded-1")) as client:
        wait_ready(client)
        assert client.get("/admin/workers").status_code == 401
        wrong = client.get("/admin/workers", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.get("/admin/workers", headers={"Authorization": TOKEN}).status_code == 401
        workers = client.get("/admin/workers", headers=AUTH).json()
        assert [(w["id"], w["state"], w["ready"]) for w in workers] == [("embedded-1", "ready", True)]
        models = client.get("/admin/models", headers=AUTH).json()
        assert [(m["worker"], m["model"], m["precision"], m["generation"]) for m in models] == [
            ("embedded-1", "tiny", "fp32", 1)]
        assert models[0]["version"].endswith("/fp32/none/r1") and models[0]["calibration_hash"] is None
        bad = client.post("/admin/requantize", json={"precision": "w4a8"}, headers=AUTH)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "precision"]
        assert client.post("/admin/requantize", json={"model": "x"}, headers=AUTH).status_code == 422


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=NO_REDIS)])
def test_requantize_while_jobs_in_flight(tiny_model_dir, backend, request):
    extra = {}
    if backend == "redis":
        extra = {"redis_url": request.getfixturevalue("redis_server").url,
                 "redis_prefix": request.getfixturevalue("redis_prefix"), "embedded_worker": True}
    settings = make_settings(tiny_model_dir, admin_token=TOKEN, max_batch=4, default_steps=4, **extra)
    with client_for(settings) as client:
        wait_ready(client)
        ids = [client.post("/v1/jobs", json={"seed": s}).json()["id"] for s in range(10)]
        r = client.post("/admin/requantize", json={"model": "tiny"}, headers=AUTH)
        assert r.status_code == 202 and r.headers["location"] == f"/admin/operations/{r.json()['id']}"
        ids += [client.post("/v1/jobs", json={"seed": s}).json()["id"] for s in range(10, 20)]
        op = wait_operation(client, r.json()["id"])
        (result,) = op["workers"].values()
        assert result["state"] == "done" and result["models"][0]["version"].endswith("/r2")
        jobs = [wait_status(client, i, {"succeeded", "failed", "cancelled"}) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 20
        versions = [j["model_version"].rsplit("/", 1)[1] for j in jobs]
        assert set(versions) <= {"r1", "r2"} and versions[-1] == "r2"
        assert versions == sorted(versions)  # no job after the swap ran on the old model
        after = client.post("/v1/generate", json={"seed": 1}).json()
        assert after["model_version"].endswith("/r2")
        assert client.get("/admin/models", headers=AUTH).json()[0]["generation"] == 2
        assert 'ptq4dm_requantizations_total{result="ok"} 1.0' in client.get("/metrics").text
