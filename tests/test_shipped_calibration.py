"""Calibration statistics shipped next to a model: the first start calibrates nothing, and a shipped cache is
read-only input (a mismatch warns, calibrates into the writable cache dir and leaves the shipped files alone)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch
from diffusers import UNet2DModel

from quantizer.diffusion.models import BUILTIN_MODEL_DIR, load_model
from quantizer.ptq import quantize_model
from quantizer.ptq.config import SERVING_PRESET
from quantizer.ptq.pipeline import SHIPPED_CALIBRATION_DIR
from quantizer.ptq.timestep_groups import TimestepGroupedUNet

pytest_plugins = ["service.testing"]
CALIBRATION = {"n_samples": 8, "steps": 4, "batch_size": 4, "n_candidates": 10, "act_samples": 4096, "seed": 11}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_builtin_model_ships_the_papers_w8a8_calibration(tmp_path):
    shipped = BUILTIN_MODEL_DIR / SHIPPED_CALIBRATION_DIR
    before = digests(shipped)
    # The paper's statistics (~60 KB) and the served preset's, mostly GPTQ's integer weights (a byte per weight,
    # stored once for the four time-step groups): a quarter of the fp32 weights, not another copy of them.
    weights = (BUILTIN_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert sum((shipped / name).stat().st_size for name in before) < 0.3 * weights

    model = quantize_model(load_model(None), "w8a8", cache_dir=tmp_path / "cache", progress=False)

    assert model.stats_source == "shipped" and model.cache_hit
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing calibrated
    assert digests(shipped) == before


def test_the_served_preset_is_shipped_too(tmp_path):
    """What `ptq4dm serve` quantizes by default: the first start must calibrate nothing."""
    model = quantize_model(load_model(None), "w8a8", {"preset": SERVING_PRESET}, cache_dir=tmp_path / "cache",
                           progress=False)
    assert model.stats_source == "shipped" and isinstance(model.unet, TimestepGroupedUNet)


def test_a_shipped_cache_that_does_not_match_warns_and_calibrates_elsewhere(tiny_model_dir, tmp_path, caplog):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    # Ship a calibration made for these weights...
    made = quantize_model(load_model(model_dir), "w8a8", CALIBRATION, cache_dir=model_dir / SHIPPED_CALIBRATION_DIR,
                          progress=False)
    assert made.stats_source == "calibrated"
    assert quantize_model(load_model(model_dir), "w8a8", CALIBRATION, cache_dir=tmp_path / "unused",
                          progress=False).stats_source == "shipped"
    shipped_files = digests(model_dir / SHIPPED_CALIBRATION_DIR)

    # ...then change the weights (a fine-tune saved over the folder).
    unet = UNet2DModel.from_pretrained(model_dir / "unet")
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)
    unet.save_pretrained(model_dir / "unet")

    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="quantizer.ptq.pipeline"):
        fresh = quantize_model(load_model(model_dir), "w8a8", CALIBRATION, cache_dir=cache, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("shipped with" in w and "model_weights" in w for w in warnings), warnings
    assert fresh.stats_source == "calibrated" and fresh.calibration_hash != made.calibration_hash
    assert any(cache.glob("*.safetensors"))  # calibrated into the writable cache
    assert digests(model_dir / SHIPPED_CALIBRATION_DIR) == shipped_files  # the shipped files are untouched
    again = quantize_model(load_model(model_dir), "w8a8", CALIBRATION, cache_dir=cache, progress=False)
    assert again.stats_source == "cache" and again.calibration_hash == fresh.calibration_hash

    # A different calibration config is simply another request, not a mismatch worth a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="quantizer.ptq.pipeline"):
        quantize_model(load_model(model_dir), "w8a8", {**CALIBRATION, "n_candidates": 12}, cache_dir=cache,
                       progress=False)
    assert not [r for r in caplog.records if "shipped with" in r.getMessage()]
