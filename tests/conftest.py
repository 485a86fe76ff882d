"""Shared fixtures: a tiny random-weight UNet (fast) and the committed built-in model."""

from __future__ import annotations

import os
import tempfile
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
