"""GPTQ weight rounding: integers on the searched grid, a smaller output error than rounding to nearest, cached
and reloaded exactly, executed as-is by the real backends."""

from __future__ import annotations

import copy

import pytest
import torch
from markers import needs_openvino
from test_quantize import FAST, calib, probe, rel_error, run  # noqa: F401  (fixtures)
from torch import nn

from quantizer.diffusion.models import load_model
from quantizer.execution.executor import build_executor
from quantizer.ptq.config import QuantConfig
from quantizer.ptq.fake_quant import weight_range
from quantizer.ptq.gptq import InputHessian, gptq_round
from quantizer.ptq.pipeline import quantize_model
from quantizer.ptq.quant_modules import QuantLayer
from quantizer.ptq.quantize import export_stats, quantize_

pytest_plugins = ["service.testing"]


def test_gptq_lowers_the_output_error_of_a_layer_on_its_own_inputs():
    torch.manual_seed(0)
    weight = torch.randn(32, 96)
    x = torch.randn(2048, 96) @ torch.randn(96, 96) * 0.3  # correlated inputs, as real activations are
    hessian = InputHessian(nn.Linear(96, 32), seed=0)
    hessian.update(x)
    qrange = weight_range(4)
    scale = weight.abs().amax(1) / qrange.qmax
    rounded = gptq_round(weight, scale, qrange, hessian.hessian())
    nearest = torch.round(weight / scale[:, None])
    assert rounded.dtype == torch.int8 and rounded.abs().max() <= qrange.qmax

    def output_error(q: torch.Tensor) -> float:
        return float(((x @ (weight - q.float() * scale[:, None]).T) ** 2).mean())

    assert output_error(rounded) < 0.7 * output_error(nearest)
    assert 0.5 < float((rounded.float() == nearest).float().mean()) < 1  # it moves some integers, not all


def test_conv_hessian_is_the_im2col_second_moment():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    hessian = InputHessian(conv, seed=0, max_rows=10_000)
    hessian.update(x)
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27).double()
    assert torch.allclose(hessian.hessian(), patches.T @ patches / len(patches))


def test_gptq_rounding_is_exported_reloaded_and_helps_end_to_end(tiny_unet, calib, probe):  # noqa: F811
    fp = run(tiny_unet, probe)
    nearest = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, **FAST), calibration=calib,
                        progress=False)
    gptq = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, weight_rounding="gptq", **FAST),
                     calibration=calib, progress=False)
    layers = [m for m in gptq.modules() if isinstance(m, QuantLayer)]
    for layer in layers:  # the layer's own weight now lies on its grid: every backend reads it as it is
        wq = layer.weight_quantizer
        assert torch.equal(layer.layer.weight, wq.rounded.float() * wq.scale)
    stats = export_stats(gptq)
    assert sum(k.endswith(".rounded") for k in stats) == len(layers)
    reloaded = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, weight_rounding="gptq", **FAST),
                         stats=stats, progress=False)
    assert torch.equal(run(reloaded, probe), run(gptq, probe))
    assert rel_error(run(gptq, probe), fp) < rel_error(run(nearest, probe), fp)
    bad = dict(stats)
    key = next(k for k in stats if k.endswith(".rounded"))
    bad[key] = bad[key].float()
    with pytest.raises(ValueError, match="rounded.*int8"):
        quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, weight_rounding="gptq"), stats=bad)


def test_default_config_hash_is_unchanged_by_the_option():
    assert "weight_rounding" not in QuantConfig().to_dict()
    assert QuantConfig(weight_rounding="gptq").to_dict()["weight_rounding"] == "gptq"
    with pytest.raises(ValueError, match="weight_rounding"):
        QuantConfig(weight_rounding="adaround")


@needs_openvino
def test_time_step_groups_share_one_rounding_and_openvino_runs_it(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    overrides = {"method": "uniform", "n_samples": 16, "steps": 8, "batch_size": 8, "timestep_groups": 2,
                 "weight_rounding": "gptq", **FAST}
    q = quantize_model(model, "w4a8", overrides, cache_dir=tmp_path, progress=False)
    members = q.unet.members
    for a, b in zip(members[0].modules(), members[1].modules(), strict=True):
        if isinstance(a, QuantLayer):
            assert torch.equal(a.weight_quantizer.rounded, b.weight_quantizer.rounded)
            assert a.layer.weight is b.layer.weight
    again = quantize_model(model, "w4a8", overrides, cache_dir=tmp_path, progress=False)
    assert again.stats_source == "cache" and again.calibration_hash == q.calibration_hash
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 990])
    with torch.no_grad():
        simulated = q.unet(x, t).sample
        compiled = build_executor(q.unet, "openvino")(x, t).sample
    assert rel_error(compiled, simulated) < 0.03
