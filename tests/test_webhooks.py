"""Webhooks end to end: a real receiver (http.server on loopback) gets signed calls from the embedded worker's
dispatcher, retries back off, attempts are listed on the job, and bad URLs are refused at submission.

The signature is checked here with hmac directly (not with service.webhooks), per the Standard Webhooks scheme.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import ServiceSettings

pytest_plugins = ["service.testing"]
HAVE_REDIS = shutil.which("redis-server") is not None
BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.skipif(not HAVE_REDIS, reason="no redis-server"))]
PLAIN_SECRET = "a-shared-secret"
WHSEC_KEY = secrets.token_bytes(24)


def receiver_on_loopback(statuses: list[int] | None = None):  # noqa: ANN201
    from service.testing import WebhookReceiver  # lazily: pytest loads service.testing as a plugin first

    return WebhookReceiver(statuses)


def make_settings(tiny_model_dir: Path, **overrides: object) -> ServiceSettings:
    base = {"models": [f"tiny={tiny_model_dir}"], "precisions": ["fp32"], "default_steps": 2, "max_n": 4,
            "block_ms": 100, "max_wait_ms": 5, "result_ttl_s": 120, "heartbeat_ms": 200, "lease_ms": 5000,
            "webhook_secret": PLAIN_SECRET, "webhook_allow_loopback": True, "webhook_backoff_s": 0.05,
            "webhook_timeout_s": 5}
    return ServiceSettings(**{**base, **overrides})


@pytest.fixture
def backend_settings(request: pytest.FixtureRequest) -> dict:
    if request.param == "redis":
        return {"redis_url": request.getfixturevalue("redis_server").url,
                "redis_prefix": request.getfixturevalue("redis_prefix"), "embedded_worker": True}
    return {}


def wait_until(predicate, timeout_s: float = 20.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def wait_ready(client: TestClient) -> None:
    wait_until(lambda: client.get("/readyz").status_code == 200, 60)


def expected_signature(key: bytes, headers: dict, body: bytes) -> str:
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_completed_webhook_is_signed_and_carries_the_public_record(tiny_model_dir, backend_settings):
    settings = make_settings(tiny_model_dir, **backend_settings)
    with receiver_on_loopback() as receiver, TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/v1/jobs", json={"n": 2, "seed": 3, "webhook": receiver.url,
                                          "webhook_events": ["start", "completed"]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        wait_until(lambda: len(receiver.calls) >= 2)
        job = wait_until(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["webhook_attempts"][1:] and j)
        assert job["status"] == "succeeded" and job["webhook"] == receiver.url
        assert job["webhook_events"] == ["start", "completed"]
        bodies = {json.loads(c["body"])["type"]: c for c in receiver.calls}
        assert set(bodies) == {"job.start", "job.completed"}
        call = bodies["job.completed"]
        headers, body = call["headers"], call["body"]
        assert headers["content-type"] == "application/json"
        assert headers["webhook-signature"] == expected_signature(PLAIN_SECRET.encode(), headers, body)
        assert abs(int(headers["webhook-timestamp"]) - call["at"]) < 5
        payload = json.loads(body)
        assert payload["job_id"] == job_id and payload["data"]["id"] == job_id
        assert payload["data"]["status"] == "succeeded" and payload["data"]["seeds"] == [3, 4]
        assert payload["data"]["images"] == [f"/v1/jobs/{job_id}/images/{k}" for k in range(2)]
        assert "png" not in body.decode().lower().replace("/images/", "")  # URLs, never image bytes
        assert headers["webhook-id"] != bodies["job.start"]["headers"]["webhook-id"]
        assert all(a["ok"] and a["status_code"] == 200 and a["attempt"] == 1 for a in job["webhook_attempts"])
        assert sorted(a["event"] for a in job["webhook_attempts"]) == ["completed", "start"]


@pytest.mark.parametrize("backend_settings", BACKENDS, indirect=True)
def test_500_twice_then_200_is_delivered_on_the_third_try(tiny_model_dir, backend_settings):
    secret = "whsec_" + base64.b64encode(WHSEC_KEY).decode()  # Standard Webhooks' secret format: base64 key
    settings = make_settings(tiny_model_dir, webhook_secret=secret, **backend_settings)
    with receiver_on_loopback([500, 500]) as receiver, TestClient(create_app(settings)) as client:
        wait_ready(client)
        job_id = client.post("/v1/jobs", json={"seed": 1, "webhook": receiver.url}).json()["id"]
        job = wait_until(lambda: len((j := client.get(f"/v1/jobs/{job_id}").json())["webhook_attempts"]) >= 3 and j)
        assert job["status"] == "succeeded"
        attempts = job["webhook_attempts"]
        assert [(a["attempt"], a["status_code"], a["ok"]) for a in attempts] == [(1, 500, False), (2, 500, False),
                                                                                (3, 200, True)]
        assert attempts[0]["error"] == "HTTP 500" and attempts[2]["error"] is None
        assert len({a["webhook_id"] for a in attempts}) == 1 and all(a["event"] == "completed" for a in attempts)
        # Exponential backoff between the tries: base 0.05 s, then 0.1 s.
        assert attempts[1]["at"] - attempts[0]["at"] >= 0.05 and attempts[2]["at"] - attempts[1]["at"] >= 0.1
        assert len(receiver.calls) == 3
        assert len({c["body"] for c in receiver.calls}) == 1  # every retry sends the same bytes, the same id
        assert len({c["headers"]["webhook-id"] for c in receiver.calls}) == 1
        for call in receiver.calls:
            assert call["headers"]["webhook-signature"] == expected_signature(WHSEC_KEY, call["headers"], call["body"])
        time.sleep(0.3)
        assert len(receiver.calls) == 3  # delivered: no more tries
        metrics = client.get("/metrics").text
        assert 'ptq4dm_webhook_attempts_total{outcome="http_error"} 2.0' in metrics
        assert 'ptq4dm_webhook_attempts_total{outcome="ok"} 1.0' in metrics


def test_a_receiver_that_is_down_loses_nothing_but_the_delivery(tiny_model_dir):
    with receiver_on_loopback() as receiver:
        down = receiver.url  # closed when the block ends: connections are refused
    with TestClient(create_app(make_settings(tiny_model_dir, webhook_max_attempts=2))) as client:
        wait_ready(client)
        r = client.post("/v1/generate", json={"seed": 2, "webhook": down})
        assert r.status_code == 200 and len(r.json()["images_png_base64"]) == 1
        job = wait_until(lambda: len((j := client.get(f"/v1/jobs/{r.json()['id']}").json())["webhook_attempts"])
                         >= 2 and j)
        assert job["status"] == "succeeded" and client.get(job["images"][0]).status_code == 200
        assert [a["ok"] for a in job["webhook_attempts"]] == [False, False]
        assert all(a["status_code"] is None and "Connect" in a["error"] for a in job["webhook_attempts"])


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/hook", "scheme"), ("file:///etc/passwd", "scheme"), ("example.com/hook", "scheme"),
    ("http://169.254.169.254/latest/meta-data", "metadata"), ("http://2852039166/", "metadata"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://169.254.10.1/", "link-local"), ("http://[fe80::1]/", "link-local"),
    ("http://127.0.0.1:8000/admin", "loopback"), ("http://localhost/", "loopback"), ("http://0.0.0.0/", "loopback"),
    ("http://" + "a" * 2100 + ".com/", "2048"),
])
def test_bad_webhook_urls_are_422_naming_the_field(tiny_model_dir, url, why):
    settings = make_settings(tiny_model_dir, embedded_worker=False, webhook_allow_loopback=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs", json={"webhook": url})
        assert r.status_code == 422, r.text
        error = r.json()["detail"][0]
        assert error["loc"][-1] == "webhook" and why in error["msg"], error


def test_webhook_settings_and_fields_are_checked(tiny_model_dir):
    with TestClient(create_app(make_settings(tiny_model_dir, embedded_worker=False, webhook_secret=None))) as client:
        r = client.post("/v1/jobs", json={"webhook": "https://example.com/h"})
        assert r.status_code == 422 and "webhook_secret" in r.json()["detail"][0]["msg"]
    allow = make_settings(tiny_model_dir, embedded_worker=False, webhook_allowed_hosts="hooks.example.com,*.acme.io")
    with TestClient(create_app(allow)) as client:
        assert client.post("/v1/jobs", json={"webhook": "https://hooks.example.com/h"}).status_code == 202
        assert client.post("/v1/jobs", json={"webhook": "https://ci.acme.io/h"}).status_code == 202
        refused = client.post("/v1/jobs", json={"webhook": "https://example.com/h"})
        assert refused.status_code == 422 and "webhook_allowed_hosts" in refused.json()["detail"][0]["msg"]
        bad = client.post("/v1/jobs", json={"webhook": "https://hooks.example.com/h", "webhook_events": ["done"]})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-2:] == ["webhook_events", 0]
        job = client.post("/v1/jobs", json={"webhook": "https://hooks.example.com/h",
                                            "webhook_events": ["failed", "failed", "progress"]}).json()
        assert client.get(f"/v1/jobs/{job['id']}").json()["webhook_events"] == ["failed", "progress"]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The dispatcher ignores proxy variables (trust_env=False); keep the test client from using any either."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield
