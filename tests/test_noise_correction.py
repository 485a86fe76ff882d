"""Noise correction (PTQD-style, quantizer.ptq.noise_correction): measured on real quantization of a tiny random
UNet, on held-out FP trajectories; off by default and out of every existing config's hash; cached; outside the
executed UNet."""

from __future__ import annotations

import pytest
import torch
from test_quantize import FAST, rel_error

from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.execution.executor import build_executor
from quantizer.ptq import noise_correction
from quantizer.ptq.cache import CalibrationCache
from quantizer.ptq.config import CalibrationConfig, QuantConfig
from quantizer.ptq.noise_correction import NoiseCorrectedUNet, estimate, record_pairs
from quantizer.ptq.pipeline import build_config, cache_key_parts, quantize_model
from quantizer.ptq.timestep_groups import TimestepGroupedUNet

pytest_plugins = ["service.testing"]
SMALL = {"method": "uniform", "n_samples": 16, "steps": 10, "batch_size": 8, "timestep_groups": 2, **FAST}
# build_config("w8a8").stable_hash() before the option existed (the paper's preset; its cache keys and shipped
# calibrations must not move).
PTQ4DM_W8A8_HASH = "d28791440db1898fc6caf9865078188dc2b6d1aa44bd523776dac4c2c93b29f0"


def test_off_by_default_and_out_of_the_hash_of_existing_configs(tiny_model_dir):
    assert QuantConfig().noise_correction == "none"
    assert build_config("w8a8").stable_hash() == PTQ4DM_W8A8_HASH
    for preset in ("ptq4dm", "recommended", "faithful"):
        assert "noise_correction" not in build_config("w8a8", {"preset": preset}).to_dict()["quant"]
    on = build_config("w8a8", {"preset": "recommended", "noise_correction": "ptqd"})
    assert on.to_dict()["quant"]["noise_correction"] == "ptqd"
    assert on.stable_hash() != build_config("w8a8", {"preset": "recommended"}).stable_hash()
    model = load_model(tiny_model_dir)  # the calibration statistics are shared with the same config without it
    assert cache_key_parts(model, on) == cache_key_parts(model, build_config("w8a8", {"preset": "recommended"}))


@pytest.mark.parametrize("value", ["ptq", "", None, 1, True])
def test_bad_values_are_value_errors_naming_the_field(value):
    with pytest.raises(ValueError, match="noise_correction must be one of none, bias, ptqd"):
        QuantConfig(noise_correction=value)
    with pytest.raises(ValueError, match="noise_correction"):
        build_config("w8a8", {"noise_correction": value})


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    cache = tmp_path_factory.mktemp("cache")
    corrected = {mode: quantize_model(model, "w4a8", {**SMALL, "noise_correction": mode}, cache_dir=cache,
                                      progress=False) for mode in ("bias", "ptqd")}
    # Held out: trajectories of other seeds (another calibration seed) than the correction was estimated on.
    held = record_pairs(model.unet, model.scheduler_config, CalibrationConfig(steps=10, seed=123))
    return model, corrected, held, cache


def _fit(unet, held, mode):
    """The systematic error left in `unet`'s noise estimate on the held-out pairs, per bucket of t."""
    stats = estimate(unet, held, 1000, mode)
    used = stats["noise_correction.count"] > 0
    return stats["noise_correction.scale"][used], stats["noise_correction.bias"][used]


def _mse(unet, held):
    with torch.no_grad():
        return sum(float(((unet(x, torch.tensor(t)).sample - eps) ** 2).sum())
                   for x, t, eps in zip(held.xs, held.ts, held.eps, strict=True))


def test_bias_removes_the_mean_error_and_lowers_the_error_on_held_out_pairs(setup):
    model, corrected, held, _ = setup
    q = corrected["bias"].unet
    assert isinstance(q, NoiseCorrectedUNet) and isinstance(q.unet, TimestepGroupedUNet)
    assert torch.equal(q.scale, torch.ones_like(q.scale)) and q.bias.abs().max() > 0
    _, bias_before = _fit(q.unet, held, "bias")
    _, bias_after = _fit(q, held, "bias")
    # On other trajectories than it was fitted on, the correction removes about half of the mean error (0.51 of
    # it left on an AVX512 EPYC, less on an AMX Xeon): the rest is error that differs between trajectories.
    assert bias_after.abs().mean() < 0.7 * bias_before.abs().mean()
    assert _mse(q, held) < _mse(q.unet, held)


def test_ptqd_removes_the_part_of_the_error_correlated_with_the_noise(setup):
    """Measured on held-out pairs: the slope k of the error on eps (4-bit weights shrink eps_q, k < 0) and the mean
    error both come out closer to 0. What PTQD does not do is lower the per-step error: dividing by 1 + k < 1 also
    scales up the uncorrelated residual, which its variance-schedule calibration absorbs in stochastic samplers."""
    model, corrected, held, _ = setup
    q = corrected["ptqd"].unet
    scale_before, bias_before = _fit(q.unet, held, "ptqd")
    scale_after, bias_after = _fit(q, held, "ptqd")
    assert bool((scale_before < 1).all())
    assert (scale_after - 1).abs().mean() < 0.5 * (scale_before - 1).abs().mean()
    assert bias_after.abs().mean() < bias_before.abs().mean()
    assert noise_correction.PREFIX + ".residual_var" in q.stats


def test_the_correction_survives_a_cache_round_trip_without_recomputation(setup, monkeypatch):
    model, corrected, _, cache = setup
    manifests = [m for m in CalibrationCache(cache).manifests() if "noise_correction" in m["extra"]]
    assert sorted(m["extra"]["noise_correction"] for m in manifests) == ["bias", "ptqd"]

    def no_recording(*args, **kwargs):
        raise AssertionError("a cache hit must not record trajectories")

    monkeypatch.setattr("quantizer.ptq.pipeline.record_pairs", no_recording)
    for mode, q in corrected.items():
        again = quantize_model(model, "w4a8", {**SMALL, "noise_correction": mode}, cache_dir=cache, progress=False)
        assert again.stats_source == "cache" and again.calibration_hash == q.calibration_hash
        assert torch.equal(again.unet.scale, q.unet.scale) and torch.equal(again.unet.bias, q.unet.bias)
    plain = quantize_model(model, "w4a8", SMALL, cache_dir=cache, progress=False)  # the same calibration
    assert plain.stats_source == "cache" and not isinstance(plain.unet, NoiseCorrectedUNet)
    assert plain.calibration_hash != corrected["bias"].calibration_hash


def test_the_correction_wraps_whatever_backend_runs_the_unet(setup):
    model, corrected, _, _ = setup
    q = corrected["ptqd"].unet
    assert build_executor(q, "fake").unet is q.unet
    executor = build_executor(q, "openvino", max_batch=8)
    assert isinstance(executor, NoiseCorrectedUNet) and executor.backend == "openvino"
    assert isinstance(executor.unet, TimestepGroupedUNet)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for t in (30, torch.tensor([800, 800])):
        with torch.no_grad():
            assert rel_error(executor(x, t).sample, q(x, t).sample) < 0.05
    images = sample(executor, model.scheduler_config, [0, 1], steps=3)  # DDIM, the sampler's own call
    assert images.shape == (2, 1, 16, 16) and bool(torch.isfinite(images).all())


def test_a_bucket_without_samples_is_left_uncorrected():
    n = torch.tensor([0.0, 100.0])
    sums = {name: torch.zeros(2, 1, dtype=torch.float64) for name in ("e", "d", "ee", "ed", "dd")}
    sums["e"][1], sums["ee"][1], sums["d"][1], sums["ed"][1], sums["dd"][1] = 0.0, 100.0, 10.0, -10.0, 20.0
    stats = noise_correction.fit(n, sums, "ptqd", [0, 500])
    assert stats["noise_correction.scale"].tolist() == pytest.approx([1.0, 0.9])
    assert stats["noise_correction.bias"].flatten().tolist() == pytest.approx([0.0, 0.1])
