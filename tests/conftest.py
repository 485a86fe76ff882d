"""Shared fixtures: a tiny random-weight UNet (fast), the committed built-in model, and `serve` (the app with a real
redis-server and, by default, an embedded worker) for the end-to-end serving tests."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel

from quantizer.diffusion.models import BUILTIN_MODEL_DIR
from quantizer.evaluation.train import DEFAULT_SCHEDULER_CONFIG

# A compile cache of this run's own (inherited by the processes tests start): a kernel left truncated in the user's
# cache by a process killed mid-compile elsewhere cannot fail a test ("file too short").
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ptq4dm-tests-inductor-"))

# Tiny models gain nothing from intra-op threads, and on a 2-core machine two OpenMP threads stall badly
# whenever another process (a worker under test, a background job) holds a core.
torch.set_num_threads(1)

TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


@pytest.fixture(scope="session")
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**TINY_UNET_CONFIG).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def scheduler_config() -> dict:
    return dict(DEFAULT_SCHEDULER_CONFIG)


@pytest.fixture(scope="session")
def builtin_model_dir() -> Path:
    if not (BUILTIN_MODEL_DIR / "unet" / "config.json").exists():
        pytest.fail(f"built-in model missing at {BUILTIN_MODEL_DIR}")
    return BUILTIN_MODEL_DIR


Serve = Callable[..., AbstractContextManager]


@pytest.fixture
def serve(request: pytest.FixtureRequest, tmp_path: Path) -> Serve:
    """`with serve({"name": model_dir}) as client:` the app on the session's redis-server (the module loads the
    service.testing plugin), its TestClient once every variant is ready: fp32 and w8a8 on OpenVINO, calibrated
    small (serving_helpers.CALIBRATION), 3 steps by default. `worker=False`: API-only (fp32, nothing loaded);
    keyword arguments override any setting."""
    from fastapi.testclient import TestClient
    from serving_helpers import CALIBRATION
    from test_service_api import wait_ready

    from service.api import create_app
    from service.settings import ServiceSettings

    redis, prefix = request.getfixturevalue("redis_server"), request.getfixturevalue("redis_prefix")

    @contextlib.contextmanager
    def served(models: dict[str, Path], worker: bool = True, **overrides: object) -> Iterator[TestClient]:
        settings: dict = {"redis_url": redis.url, "redis_prefix": prefix, "embedded_worker": worker,
                          "models": [f"{name}={path}" for name, path in models.items()], "precisions": ["fp32"]}
        if worker:
            settings |= {"precisions": ["fp32", "w8a8"], "backend": "openvino",
                         "calibration": {**CALIBRATION, "preset": "ptq4dm"},
                         "calibration_cache_dir": str(tmp_path / "cache"), "default_steps": 3, "block_ms": 100,
                         "max_wait_ms": 20, "heartbeat_ms": 200, "generate_timeout_s": 30}
        with TestClient(create_app(ServiceSettings(**(settings | overrides)))) as client:
            if worker:
                wait_ready(client)
            yield client

    return served
