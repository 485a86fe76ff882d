"""bench/smoothing.py: smoothing moves an outlier channel's range into the weights, and the run measures it.

Why: RESULTS cites its numbers for "smoothing does not close the noise end's int8 error"; a smoothed layer that
computed something else than the layer, or no smoothing at all, would make that reading wrong.
"""

from __future__ import annotations

import torch
from test_timestep_groups import GROUPED
from torch import nn

from bench.smoothing import InputStats, report, run, smoothed_layer
from quantizer.diffusion.models import load_model
from quantizer.ptq.config import QuantConfig
from quantizer.ptq.fake_quant import act_range, fake_quantize, weight_range
from quantizer.ptq.quant_modules import QuantLinear
from quantizer.ptq.scale_search import search_act_qparams, search_weight_scale

pytest_plugins = ["service.testing"]


def test_a_smoothed_layer_quantizes_an_outlier_channel_input_closer_than_one_range():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(4096, 16)
    x[:, 3] *= 200  # one channel sets the per-tensor range: the others get a few levels
    with torch.no_grad():
        layer.weight[:, 3] /= 200  # ...and weighs no more than they do in the output
    ref = layer(x).detach()
    quant = QuantConfig(weight_bits=8, act_bits=8)
    stats = InputStats(conv=False, seed=0)
    stats.update(x)

    w_scale = search_weight_scale(layer.weight, 8, quant.metric, quant.p)
    scale, zero_point = search_act_qparams(x, 8, quant.metric, quant.p)
    plain = nn.functional.linear(fake_quantize(x, scale, zero_point, act_range(8)),
                                 fake_quantize(layer.weight.detach(), w_scale[:, None], 0, weight_range(8)), layer.bias)
    smoothed = smoothed_layer(QuantLinear(layer, 8, 8), layer, stats, 0.5, quant)
    assert smoothed.smooth[3] > 5 * smoothed.smooth.median()  # the outlier channel is scaled down the most
    err = lambda y: float((y.detach() - ref).norm() / ref.norm())  # noqa: E731
    assert err(smoothed(x)) < 0.5 * err(plain)


def test_the_run_measures_each_float_group_at_each_alpha(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    result = run(model, "w8a8", {**GROUPED, "float_groups": 1}, [0.0, 0.5], n_pairs=32, cache_dir=str(tmp_path))
    row = result["groups"]["500-1000"]
    assert list(result["groups"]) == ["500-1000"] and 0 < row["pairs"] < 32 and row["calibration_samples"] > 0
    assert row["int8"] > 0.001 and all(0 < e < 1 for e in row["alphas"].values())
    assert row["alphas"]["0.0"] != row["alphas"]["0.5"]
    text = report(result, "cmd")
    assert "| int8 | smoothed, alpha 0.0 | smoothed, alpha 0.5 |" in text and f"{row['int8']:.5f}" in text
