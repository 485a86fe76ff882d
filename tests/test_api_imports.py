"""An API-only process (Redis queue, no embedded worker) carries no ML stack: torch, diffusers and the worker stay
unimported while it builds the app and serves, and validates, requests. Checked in fresh interpreters, since this
test process has imported torch already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from quantizer import constants

pytest_plugins = ["service.testing"]
REPO = Path(__file__).resolve().parents[1]
ML_MODULES = ("torch", "diffusers", "service.worker", "service.provider", "quantizer.engine")

# Peak RSS of this interpreter. Not getrusage's ru_maxrss: Linux carries that over from the parent across exec, so
# a child of this (torch-laden) test process would report the parent's peak.
PEAK_RSS = """
import resource
def peak_rss_kib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


def _run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS + code, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_api_process_never_imports_the_ml_stack(redis_server, redis_prefix, capsys):
    api = _run(API_ONLY, redis_server.url, redis_prefix, *ML_MODULES)
    assert api["loaded"] == []
    # Queued without any model loaded; precision and model are validated from the settings alone.
    assert api["codes"] == [202, 422, 422] and api["ready"] == 200
    assert api["playground"] == [200, 200]  # the browser playground is static files: no ML stack either
    # what the playground reads to offer a class or a prompt: from the configs, and null where none is readable
    assert [(m["name"], m["kind"], m["num_classes"], m["default"]) for m in api["models"]] == [
        ("tiny", None, None, True), ("cond", "class-conditional", 10, False)]
    assert api["models"][1]["class_names"][3] == "Dress"  # the built-in class-conditional model names its classes
    worker = _run(WORKER)
    with capsys.disabled():
        print(f"\nmax RSS: API process (import service.api, build the app, 3 requests) {api['rss_kib'] / 1024:.0f} "
              f"MiB; import service.worker {worker['rss_kib'] / 1024:.0f} MiB")


def test_the_library_reads_its_constants_from_the_torch_free_module():
    """One definition: the modules that import torch re-export what the API process reads from quantizer.constants."""
    from quantizer.diffusion.models import BUILTIN_MODEL_NAME
    from quantizer.ptq.cache import DEFAULT_CALIBRATION_CACHE_DIR
    from quantizer.ptq.config import PRECISION_PRESETS, PRESETS, SERVING_PRESET

    assert constants.BUILTIN_MODEL_NAME is BUILTIN_MODEL_NAME
    assert constants.DEFAULT_CALIBRATION_CACHE_DIR is DEFAULT_CALIBRATION_CACHE_DIR
    assert constants.SERVING_PRESET is SERVING_PRESET and SERVING_PRESET in PRESETS
    assert constants.PRECISION_PRESETS is PRECISION_PRESETS

# Builds the API-only app, submits one valid and two invalid requests, loads the playground and what it reads of the
# models, then reports what got imported and its RSS.
API_ONLY = """
import json, sys
from fastapi.testclient import TestClient
from service.api import create_app
from service.settings import ServiceSettings
settings = ServiceSettings(redis_url=sys.argv[1], redis_prefix=sys.argv[2], embedded_worker=False,
                           models=["tiny=/nowhere/tiny", "cond=models/fashion-mnist-ddpm-cond"],
                           precisions=["fp32", "w8a8"])
with TestClient(create_app(settings)) as client:
    codes = [client.post("/v1/jobs", json=body).status_code
             for body in ({"seed": 1}, {"precision": "w3a3"}, {"model": "other"})]
    ready = client.get("/readyz").status_code
    playground = [client.get(path).status_code for path in ("/", "/playground/app.js")]
    models = client.get("/v1/models").json()
print(json.dumps({"codes": codes, "ready": ready, "playground": playground, "models": models,
                  "rss_kib": peak_rss_kib(),
                  "loaded": [m for m in sys.argv[3:] if m in sys.modules]}))
"""

WORKER = """
import json
import service.worker
print(json.dumps({"rss_kib": peak_rss_kib()}))
"""
