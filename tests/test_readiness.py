"""Each precision becomes ready on its own: fp32 serves while a quantized precision waits or calibrates, and the
calibration reports its progress (stages, fractions, ETA) to the log and to /readyz."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from fastapi.testclient import TestClient
from test_service_api import client_for, make_settings, wait_ready, wait_status

from quantizer.diffusion.models import load_model
from quantizer.ptq import quantize_model
from quantizer.ptq.progress import ProgressLog, Snapshot
from service.api import create_app
from service.provider import available_precisions
from service.queue import MemoryBackend

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.skipif("w8a8" not in available_precisions(), reason="quantizer.ptq not installed")
CALIBRATION = {"n_samples": 8, "steps": 4, "batch_size": 4, "n_candidates": 10, "act_samples": 4096}
STAGES = {"calibration set (ndtc)", "weight ranges", "calibration forward", "activation ranges"}


def test_fp32_serves_while_w8a8_waits_for_another_workers_calibration(tiny_model_dir, tmp_path):
    """Another worker holds the calibration lock (as when two workers start together): w8a8 waits, fp32 does not,
    a w8a8 job waits in its queue instead of being refused, and runs once the lock is released."""
    settings = make_settings(tiny_model_dir, precisions=["fp32", "w8a8"], calibration=CALIBRATION, backend="fake",
                             calibration_cache_dir=str(tmp_path / "cache"))
    backend = MemoryBackend()
    lock = "calibrate:tiny:w8a8"
    assert asyncio.run(backend.bus.acquire_lock(lock, "other-worker", 600_000))
    with TestClient(create_app(settings, backend=backend)) as client:
        wait_ready(client, all_models=False)
        models = client.get("/readyz").json()["models"]
        assert models["tiny/fp32"]["state"] == "ready"
        assert models["tiny/w8a8"]["state"] == "calibrating"
        assert "calibration lock" in models["tiny/w8a8"]["stage"]

        waiting = client.post("/v1/jobs", json={"seed": 1, "precision": "w8a8"})
        assert waiting.status_code == 202
        fp = client.post("/v1/generate", json={"seed": 1})
        assert fp.status_code == 200 and fp.json()["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{waiting.json()['id']}").json()["status"] == "queued"

        client.portal.call(backend.bus.release_lock, lock, "other-worker")
        done = wait_status(client, waiting.json()["id"], {"succeeded", "failed"}, timeout_s=60)
        assert done["status"] == "succeeded" and "/w8a8/" in done["model_version"]
        assert client.get("/readyz").json()["models"]["tiny/w8a8"]["state"] == "ready"


def test_a_quantized_precision_that_fails_to_load_fails_its_jobs_and_leaves_fp32_serving(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, precisions=["fp32", "w8a8"], backend="fake",
                             calibration={**CALIBRATION, "method": "real_noised"},  # needs images: fails
                             calibration_cache_dir=str(tmp_path / "cache"))
    with client_for(settings) as client:
        wait_ready(client, all_models=False)
        deadline = time.monotonic() + 60
        while (state := client.get("/readyz").json()["models"]["tiny/w8a8"])["state"] != "failed":
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert "real_images" in state["error"]
        failed = client.post("/v1/generate", json={"precision": "w8a8"})  # queued, then failed by the worker
        assert failed.status_code == 500 and "real_images" in failed.json()["detail"]
        assert client.get(f"/v1/jobs/{failed.json()['id']}").json()["status"] == "failed"
        assert client.post("/v1/generate", json={}).json()["status"] == "succeeded"
        assert client.get("/readyz").status_code == 200


def test_calibration_reports_every_stage_with_fractions_and_eta(tiny_model_dir, caplog):
    model = load_model(tiny_model_dir)
    seen: list[Snapshot] = []
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        # Its own seed: a calibration set another test built is reused in-process, with no stage to report.
        quantize_model(model, "w8a8", {**CALIBRATION, "seed": 7}, progress=False,
                       on_progress=ProgressLog("calibrating tiny/w8a8", log, listener=seen.append))
    assert {s.stage for s in seen} == STAGES
    for stage in STAGES:
        fractions = [s.fraction for s in seen if s.stage == stage]
        assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    lines = [r.getMessage() for r in caplog.records]
    assert any("calibration set (ndtc)" in line and "ETA" in line for line in lines), lines
    assert all(line.startswith("calibrating tiny/w8a8: ") for line in lines)
    # One line per 5% at most per stage (plus the first): the log stays readable for a 20-minute calibration.
    for stage in STAGES:
        assert sum(stage in line for line in lines) <= 21


def test_fp32_jobs_complete_while_w8a8_is_still_calibrating(tiny_model_dir, tmp_path):
    """A calibration far too long to finish within the test: fp32 serves meanwhile, the w8a8 job waits in its
    queue, /readyz shows the calibration's stage and progress, and shutdown stops the calibration."""
    slow = {**CALIBRATION, "n_samples": 4096, "steps": 500, "batch_size": 64}
    settings = make_settings(tiny_model_dir, precisions=["fp32", "w8a8"], calibration=slow, backend="fake",
                             calibration_cache_dir=str(tmp_path / "cache"))
    with client_for(settings) as client:
        wait_ready(client, all_models=False)
        waiting = client.post("/v1/jobs", json={"seed": 3, "precision": "w8a8"}).json()["id"]
        deadline = time.monotonic() + 60
        while (w8a8 := client.get("/readyz").json()["models"]["tiny/w8a8"])["progress"] is None:
            assert time.monotonic() < deadline, w8a8
            time.sleep(0.05)
        for seed in range(3):
            fp = client.post("/v1/generate", json={"seed": seed})
            assert fp.status_code == 200 and fp.json()["status"] == "succeeded"
        w8a8 = client.get("/readyz").json()["models"]["tiny/w8a8"]
        assert w8a8["state"] == "calibrating" and w8a8["stage"] == "calibration set (uniform)"  # the served preset
        assert 0 <= w8a8["progress"] < 1 and w8a8["error"] is None
        assert client.get(f"/v1/jobs/{waiting}").json()["status"] == "queued"
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # stopped, not finished
