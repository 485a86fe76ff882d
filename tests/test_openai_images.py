"""POST /v1/images/generations driven by the official `openai` client against a real `ptq4dm serve` (embedded
worker, tiny 16x16 model): b64 and url PNGs, extensions, and errors in OpenAI's shape naming the field."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_priority_service import ServeProcess
from test_service_api import client_for, make_settings

pytest_plugins = ["service.testing"]
ADMIN_TOKEN = "adm1n"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ServeProcess]:
    serve = ServeProcess(tiny_model_dir, **{"admin-token": ADMIN_TOKEN, "high-priority-requires-token": "true",
                                            "max-n": 4, "generate-timeout-s": 60})
    try:
        serve.wait_ready()
        yield serve
    finally:
        serve.stop()


def client(server: ServeProcess, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_b64_json_pngs_of_the_model_size(server):
    before = int(time.time())
    result = client(server).images.generate(prompt="", n=2, size="16x16", response_format="b64_json",
                                            extra_body={"seed": 3, "steps": 2, "sampler": "ddim", "precision": "fp32"})
    assert before <= result.created <= time.time() + 1
    images = [png(base64.b64decode(d.b64_json)) for d in result.data]
    assert [i.size for i in images] == [(16, 16), (16, 16)] and all(d.url is None for d in result.data)
    # Extensions are real: the seed picks the images (image k = seed + k), the default model and size apply.
    again = client(server).images.generate(prompt="", model="tiny", size="auto", extra_body={"seed": 4, "steps": 2})
    alone, second, first = (np.asarray(png(base64.b64decode(d.b64_json)), dtype=np.int16)
                            for d in (again.data[0], result.data[1], result.data[0]))
    # seed 4 alone = image 2 of the seed-3 request, up to fp32 kernels that round by batch size (AVX512 without
    # AMX: a level here and there); seed 3's image is another picture
    assert np.abs(alone - second).max() <= 2
    assert np.abs(alone - first).mean() > 10 * (np.abs(alone - second).mean() + 0.1)


def test_url_pngs_are_fetchable(server):
    result = client(server).images.generate(prompt="", n=2, response_format="url", extra_body={"seed": 3, "steps": 2})
    assert len(result.data) == 2 and all(d.b64_json is None for d in result.data)
    for d in result.data:
        assert d.url.startswith(f"{server.url}/v1/jobs/")
        r = httpx.get(d.url)
        assert r.status_code == 200 and png(r.content).size == (16, 16)


@pytest.mark.parametrize(("kwargs", "status", "param"), [
    ({"size": "1024x1024"}, 422, "size"),
    ({"prompt": "a red shoe"}, 422, "prompt"),
    ({"model": "dall-e-3"}, 422, "model"),
    ({"n": 5}, 422, "n"),
    ({"response_format": "webp"}, 422, "response_format"),
    ({"extra_body": {"steps": 0}}, 422, "steps"),
    ({"extra_body": {"priority": "high"}}, 403, "priority"),
    ({"style": "vivid"}, 422, "style"),
])
def test_errors_are_openai_shaped_and_name_the_field(server, kwargs, status, param):
    kwargs = {"prompt": "", **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client(server).images.generate(**kwargs)
    err = info.value
    assert err.status_code == status and err.param == param, err.body
    assert set(err.body) >= {"message", "type", "param", "code"} and param in err.body["message"]
    assert err.type == ("permission_error" if status == 403 else "invalid_request_error")


def test_high_priority_with_the_admin_token_as_api_key(server):
    result = client(server, api_key=ADMIN_TOKEN).images.generate(prompt="", extra_body={"priority": "high",
                                                                                         "steps": 2})
    assert png(base64.b64decode(result.data[0].b64_json)).size == (16, 16)


def test_timeout_and_full_queue_keep_openai_shape_and_headers(tiny_model_dir):
    """No worker: the first request times out (504, not to be retried: the job stays queued), the next finds the
    queue full (429 with Retry-After, which a client may retry)."""
    settings = make_settings(tiny_model_dir, embedded_worker=False, max_queue=1, generate_timeout_s=0.2)
    with client_for(settings) as http:
        http: TestClient
        timeout = http.post("/v1/images/generations", json={"prompt": ""})
        assert timeout.status_code == 504 and timeout.headers["x-should-retry"] == "false"
        assert timeout.json()["error"]["type"] == "timeout_error"
        job = http.get(timeout.headers["location"]).json()
        assert job["status"] == "queued"
        full = http.post("/v1/images/generations", json={"prompt": ""})
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["type"] == "rate_limit_error" and full.json()["error"]["code"] == "queue_full"
        broken = http.post("/v1/images/generations", content=b"{", headers={"content-type": "application/json"})
        assert broken.status_code == 422 and set(broken.json()) == {"error"}
