"""Hostile input through HTTP: body limit (413), short 422s, strict request types, 405 Allow, documented errors,
the admin security scheme and /docs without a network. The app is the real one, without a worker (no model runs)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import ServiceSettings

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    model_dir: Path = tmp_path_factory.mktemp("no-model")  # never loaded: no worker in this process
    settings = ServiceSettings(models=[f"tiny={model_dir}"], precisions=["fp32"], embedded_worker=False,
                               max_body_bytes=LIMIT, admin_token="s3cret", max_steps=10, max_n=4)
    with TestClient(create_app(settings)) as c:
        yield c


def test_oversized_body_with_content_length_is_413_before_parsing(client):
    r = client.post("/v1/jobs", content=b"{" + b" " * LIMIT + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    # Not even JSON: refused on size alone, never parsed.
    assert client.post("/v1/generate", content=b"\xff" * (LIMIT + 1)).status_code == 413


def test_oversized_chunked_body_is_counted_and_413(client):
    def chunks() -> Iterator[bytes]:
        for _ in range(LIMIT // 1024 + 1):
            yield b" " * 1024

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


def test_body_under_the_limit_still_reaches_validation_chunked_or_not(client):
    body = json.dumps({"steps": 0, "pad": " " * (LIMIT // 2)}).encode()
    plain = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    chunked = client.post("/v1/jobs", content=iter([body[:100], body[100:]]),
                          headers={"content-type": "application/json"})
    for r in (plain, chunked):
        assert r.status_code == 422 and {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "steps"),
                                                                                          ("body", "pad")}


def test_megabyte_invalid_field_gives_a_small_422(tmp_path):
    settings = ServiceSettings(models=[f"tiny={tmp_path}"], precisions=["fp32"], embedded_worker=False,
                               max_body_bytes=4 * 1024 * 1024)
    with TestClient(create_app(settings)) as c:
        big = "x" * (1024 * 1024)
        for body in ({"sampler": big}, {"model": big}, {"precision": big}, {big: 1}, {"steps": big}):
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 422 and len(r.content) < 4096, (list(body)[0][:10], len(r.content))
            err = r.json()["detail"][0]
            assert len(err["loc"][-1]) <= 70 and len(json.dumps(err)) < 1024
            if "input" in err and isinstance(err["input"], str) and err["input"].startswith("x"):
                assert err["input_truncated"] is True and err["input"] == "x" * 64
        many = c.post("/v1/jobs", json={f"extra{i}": i for i in range(5000)})
        assert many.status_code == 422 and len(many.content) < 4096
        assert len(many.json()["detail"]) == 10 and many.json()["more_errors"] == 4990


@pytest.mark.parametrize(("body", "field"), [
    ({"seed": False}, "seed"), ({"seed": True}, "seed"), ({"steps": "5"}, "steps"), ({"n": 2.0}, "n"),
    ({"n": "2"}, "n"), ({"eta": "0.5"}, "eta"), ({"eta": True}, "eta"), ({"sampler": 1}, "sampler"),
])
def test_strict_types_name_the_field(client, body, field):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", field]]


def test_non_finite_numbers_are_422_not_500(client):
    r = client.post("/v1/jobs", content=b'{"eta": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "eta"]
    r = client.post("/v1/generate", content=b'{"timeout_s": Infinity}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "timeout_s"]


def test_floats_take_integers_and_valid_bodies_still_pass_validation(client):
    """eta: 0 is a number; what is left is the server's own limits (a 422 from field_error naming steps)."""
    r = client.post("/v1/jobs", json={"eta": 0, "timeout_s": 1} | {"steps": 11})
    assert r.status_code == 422 and [e["loc"][-1] for e in r.json()["detail"]] == ["timeout_s"]
    r = client.post("/v1/jobs", json={"eta": 0, "steps": 11})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]


def test_field_error_clips_what_it_echoes(client):
    r = client.post("/v1/jobs", json={"model": "m" * 50_000})
    err = r.json()["detail"][0]
    assert r.status_code == 422 and err["loc"] == ["body", "model"] and "served" in err["msg"]
    assert err["input"] == "m" * 64 and err["input_truncated"] is True and len(r.content) < 1024
    r = client.post("/admin/requantize", json={"precision": "p" * 50_000}, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 422 and len(r.content) < 1024 and r.json()["detail"][0]["input_truncated"] is True


def test_undecodable_body_is_400(client):
    r = client.post("/v1/jobs", content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and isinstance(r.json()["detail"], str)


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "PATCH", "POST"])
def test_405_lists_every_method_of_the_path(client, method):
    r = client.request(method, "/v1/jobs/some-id")
    assert r.status_code == 405 and r.headers["allow"] == "GET, DELETE"
    assert r.json() == {"detail": "Method Not Allowed"}
    assert client.get("/v1/jobs").headers["allow"] == "POST"


def test_admin_auth_semantics_with_the_bearer_scheme(client, tmp_path):
    assert client.get("/admin/workers").status_code == 401
    wrong = client.get("/admin/workers", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/admin/workers", headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert client.get("/admin/workers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    no_token = ServiceSettings(models=[f"tiny={tmp_path}"], precisions=["fp32"], embedded_worker=False)
    with TestClient(create_app(no_token)) as c:
        assert c.get("/admin/workers", headers={"Authorization": "Bearer s3cret"}).status_code == 404


def test_openapi_documents_every_error_and_the_admin_scheme(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "PTQ4DM_ADMIN_TOKEN"}
    paths = spec["paths"]
    for path, ops in paths.items():
        for op in ops.values():
            assert (op.get("security") == [{"HTTPBearer": []}]) == path.startswith("/admin"), path
    expected = {
        ("/v1/jobs", "post"): {"202", "400", "403", "409", "413", "422", "429", "503"},
        ("/v1/jobs/{job_id}", "get"): {"200", "404", "422", "503"},
        ("/v1/jobs/{job_id}", "delete"): {"200", "404", "409", "422", "503"},
        ("/v1/jobs/{job_id}/images/{k}", "get"): {"200", "404", "409", "422", "503"},
        ("/v1/generate", "post"): {"200", "202", "400", "403", "404", "409", "413", "422", "429", "500", "503"},
        ("/admin/requantize", "post"): {"202", "400", "401", "404", "413", "422", "503"},
        ("/admin/workers", "get"): {"200", "401", "404", "503"},
        ("/readyz", "get"): {"200", "503"},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == statuses, (path, method, set(responses))
        for status in statuses - {"200", "202"}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema.get("$ref", "").rsplit("/", 1)[-1] in {"ErrorDetail", "ValidationErrorBody", ""}, schema
    assert paths["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ValidationErrorBody")
    job_request = spec["components"]["schemas"]["JobRequest"]["properties"]
    assert job_request["precision"]["enum"] == ["fp32"] and job_request["n"]["maximum"] == 4


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_are_served_without_any_external_host(client, page):
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text, re.IGNORECASE), r.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(a.endswith(".js") for a in assets), assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100, url
    assert client.get(re.search(r"""(?:url|spec-url)[:=]\s*['"]([^'"]+)['"]""", r.text).group(1)).status_code == 200
