"""bench/noise_end_layers.py: the greedy ranking floats exactly the layers it names, and its numbers add up.

Why: the ranking picks the layers a preset keeps in float at the noise end (QuantConfig.float_group_layers); a
switch that left a layer quantized, or an error measured on the wrong time-steps, would pick the wrong ones.
"""

from __future__ import annotations

from test_timestep_groups import GROUPED

from bench.noise_end_layers import LayerSwitch, rel_error, report, run
from bench.sensitivity import eps
from quantizer.diffusion.models import load_model
from quantizer.ptq.calibration import build_calibration_set
from quantizer.ptq.config import CalibrationConfig
from quantizer.ptq.pipeline import quantize_model
from quantizer.ptq.quant_modules import QuantLayer

pytest_plugins = ["service.testing"]


def test_greedy_floats_layers_until_the_noise_end_group_is_the_float_model(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    config = {**GROUPED, "float_groups": 1}
    n_layers = sum(isinstance(m, QuantLayer) for m in
                   quantize_model(model, "w8a8", GROUPED, cache_dir=tmp_path, progress=False).unet.members[1].modules())
    result = run(model, "w8a8", config, n_pairs=32, steps=n_layers, cache_dir=str(tmp_path))
    assert list(result["groups"]) == ["500-1000"]  # only the float group is ranked
    row = result["groups"]["500-1000"]
    errors = [s["rel_error"] for s in row["steps"]]
    assert 0 < row["pairs"] < 32 and row["int8"] > 0.001
    assert len({s["layer"] for s in row["steps"]}) == n_layers  # each layer once
    assert errors[0] < row["int8"] and errors[-1] < 1e-6  # every layer float: the float model
    shares = [s["mac_share"] for s in row["steps"]]
    assert all(a <= b for a, b in zip(shares, shares[1:], strict=False)) and 0 < shares[-1] <= 1 + 1e-9
    assert "| + float layer | rel. error | float MAC share |" in report(result, "cmd")


def test_the_switch_puts_the_float_layer_in_and_back(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    member = quantize_model(model, "w8a8", GROUPED, cache_dir=tmp_path, progress=False).unet.members[1]
    switch = LayerSwitch(member, model.unet)
    name = next(iter(switch.quantized))
    pairs = build_calibration_set(model.unet, model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=4, steps=4, seed=5), progress=False)
    quantized, fp = eps(member, pairs), eps(model.unet, pairs)
    switch.set_float({name})
    assert member.get_submodule(name) is model.unet.get_submodule(name)
    switch.set_float(set(switch.quantized))
    assert rel_error(member, pairs, fp, 1000) < 1e-6
    switch.set_float(set())
    assert isinstance(member.get_submodule(name), QuantLayer) and rel_error(member, pairs, quantized, 1000) == 0


def test_a_residual_preset_is_ranked_on_its_residual_passes_and_the_weights_share_is_reported(tiny_model_dir,
                                                                                                tmp_path):
    model = load_model(tiny_model_dir)
    plain = run(model, "w8a8", {**GROUPED, "float_groups": 1}, n_pairs=32, steps=1,
                cache_dir=str(tmp_path))["groups"]["500-1000"]
    residual = run(model, "w8a8", {**GROUPED, "float_groups": 1, "float_group_mode": "residual"}, n_pairs=32,
                   steps=1, cache_dir=str(tmp_path))
    row = residual["groups"]["500-1000"]
    assert residual["residual"] and row["pairs"] == plain["pairs"]
    # the residual pass takes input rounding away (not the clipping, which this tiny model's ranges do a lot of):
    # below int8, above what the weights alone leave, which it does not touch
    assert 0 < plain["weights_only"] < plain["int8"] and abs(row["weights_only"] - plain["weights_only"]) < 1e-9
    assert row["weights_only"] < row["int8"] < 0.75 * plain["int8"]
    assert "all int8 + residual" in report(residual, "cmd") and "only the weights on their grid" in report(residual,
                                                                                                          "cmd")
