"""Quantized precisions through the service: fake-quant and real int8 variants, calibration cache, one calibrator."""

from __future__ import annotations

import asyncio
import base64
import shutil

import pytest
from test_service_admin import AUTH, TOKEN, wait_operation
from test_service_api import client_for, decode, make_settings, wait_ready

from quantizer.evaluation.metrics import psnr
from quantizer.execution.int8_x86 import int8_supported
from service.metrics import Metrics
from service.provider import ModelProvider, available_precisions
from service.settings import ServiceSettings
from service.worker import Worker

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.skipif("w8a8" not in available_precisions(), reason="quantizer.ptq not installed")
# Small enough to calibrate the tiny UNet in about a second.
CALIBRATION = {"n_samples": 8, "steps": 4, "batch_size": 8, "n_candidates": 10, "act_samples": 4096}


def test_w8a8_jobs_carry_calibration_hash_and_requantize_changes_it(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, precisions=["fp32", "w8a8"], calibration=CALIBRATION, backend="fake",
                             calibration_cache_dir=str(tmp_path / "cache"), admin_token=TOKEN)
    with client_for(settings) as client:
        wait_ready(client)
        fp = client.post("/v1/generate", json={"seed": 4}).json()
        q = client.post("/v1/generate", json={"seed": 4, "precision": "w8a8"}).json()
        assert q["status"] == "succeeded" and "/w8a8/" in q["model_version"] and len(q["calibration_hash"]) == 64
        assert fp["calibration_hash"] is None and fp["images_png_base64"] != q["images_png_base64"]
        refused = client.post("/v1/jobs", json={"precision": "w4a8"})
        assert refused.status_code == 422 and "['fp32', 'w8a8']" in refused.json()["detail"][0]["msg"]
        op = client.post("/admin/requantize", json={"precision": "w8a8", "calibration": {"seed": 1}},
                         headers=AUTH).json()
        (result,) = wait_operation(client, op["id"])["workers"].values()
        assert result["state"] == "done" and result["models"][0]["precision"] == "w8a8"
        fresh = client.post("/v1/generate", json={"seed": 4, "precision": "w8a8"}).json()
        assert fresh["calibration_hash"] == result["models"][0]["calibration_hash"] != q["calibration_hash"]
        assert fresh["model_version"].endswith("/r2")
        bad = client.post("/admin/requantize", json={"precision": "w8a8", "calibration": {"bogus": 1}},
                          headers=AUTH).json()
        (failed,) = wait_operation(client, bad["id"])["workers"].values()
        assert failed["state"] == "failed" and "bogus" in failed["error"]
        assert client.post("/v1/generate", json={"precision": "w8a8"}).json()["status"] == "succeeded"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
def test_workers_starting_together_calibrate_once(tiny_model_dir, tmp_path, redis_server, redis_prefix):
    from service.queue.redis import RedisBackend

    settings = ServiceSettings(models=[f"tiny={tiny_model_dir}"], precisions=["w8a8"], calibration=CALIBRATION,
                               calibration_cache_dir=str(tmp_path / "cache"), redis_url=redis_server.url,
                               redis_prefix=redis_prefix, backend="fake")

    async def start_two() -> list[dict]:
        workers = []
        for i in range(2):
            s = settings.model_copy(update={"worker_id": f"w{i}"})
            provider = ModelProvider(s.model_paths, s.precisions, s.calibration_cache_dir, calibration=s.calibration,
                                     backend=s.backend)
            workers.append(Worker(s, RedisBackend(s.redis_url, s.redis_prefix), provider, Metrics()))
        await asyncio.gather(*(w.start() for w in workers))
        running = [asyncio.create_task(w.run()) for w in workers]  # the quantized variants are prepared in run()
        await asyncio.gather(*(w.prepared() for w in workers))
        described = [w.provider.describe()[0] for w in workers]
        for w in workers:
            w.request_stop()
        await asyncio.gather(*running)
        for w in workers:
            await w.backend.close()
        return described

    described = asyncio.run(start_two())
    assert sorted(d["cache_hit"] for d in described) == [False, True]
    assert described[0]["calibration_hash"] == described[1]["calibration_hash"]


@pytest.mark.parametrize("backend, preset", [
    # int8-x86 runs one range per tensor (the paper's preset); openvino also the served one's time-step groups.
    pytest.param("int8-x86", "ptq4dm", marks=pytest.mark.skipif(int8_supported() is not None,
                                                               reason=f"int8-x86 unavailable: {int8_supported()}")),
    ("openvino", "recommended"),
])
def test_w8a8_served_on_real_int8_kernels_matches_the_simulation(tiny_model_dir, tmp_path, backend, preset):
    common = {"precisions": ["w8a8"], "calibration": {**CALIBRATION, "preset": preset},
              "calibration_cache_dir": str(tmp_path / "cache"), "admin_token": TOKEN, "max_batch_images": 2,
              "compile_all_buckets": True}
    # int8-x86's warm-up compiles a graph per batch bucket (about 25 s each with a cold inductor cache).
    images = {}
    for run_on in (backend, "fake"):
        with client_for(make_settings(tiny_model_dir, backend=run_on, **common)) as client:
            wait_ready(client, timeout_s=600)
            (served,) = client.get("/admin/models", headers=AUTH).json()
            assert served["backend"] == run_on
            job = client.post("/v1/generate", json={"seed": 11, "n": 3, "precision": "w8a8"}).json()
            assert job["status"] == "succeeded" and len(job["images_png_base64"]) == 3
            images[run_on] = [decode(base64.b64decode(png)) for png in job["images_png_base64"]]
    for real, fake in zip(images[backend], images["fake"], strict=True):  # one calibration, two executions
        assert psnr(fake.reshape(1, 16, 16, 1), real.reshape(1, 16, 16, 1))[0] > 25
