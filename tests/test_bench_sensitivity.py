"""bench/sensitivity.py's switches: exactly the tensors a measurement names are quantized, nothing else.

Why: the sensitivity report ranks layers for mixed precision; a switch that leaked (a weight left quantized, an
input left float) would rank the wrong layers.
"""

from __future__ import annotations

import copy

import torch
from test_quantize import FAST, calib, probe, rel_error, run  # noqa: F401 - fixtures

from bench.sensitivity import configure, one_forward_errors, setting
from quantizer.ptq.config import PTQ4DMConfig, QuantConfig
from quantizer.ptq.quant_modules import QuantLayer
from quantizer.ptq.quantize import quantize_, set_mode


def test_switches_quantize_exactly_what_they_name(tiny_unet, calib, probe):  # noqa: F811
    unet = quantize_(copy.deepcopy(tiny_unet), PTQ4DMConfig(quant=QuantConfig(**FAST)), calibration=calib,
                     progress=False)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, QuantLayer)}
    fp, served = run(tiny_unet, probe), run(unet, probe)  # quantize_ leaves the model in quant mode

    configure(layers, *setting(layers, None, "all"))
    assert torch.equal(run(unet, probe), served)
    configure(layers, (), ())
    assert torch.equal(run(unet, probe), fp)

    name = next(iter(layers))  # conv_in
    weights, activations = setting(layers, name, "all but")
    assert weights == activations == set(layers) - {name}
    assert setting(layers, name, "weights") == ({name}, set())
    assert setting(layers, name, "activations") == (set(), {name})
    configure(layers, weights, activations)
    assert layers[name].mode == "fp" and layers[name].input_quantizer.mode == "fp"
    assert all(m.mode == "quant" and m.input_quantizer.mode == "quant" for n, m in layers.items() if n != name)
    configure(layers, *setting(layers, name, "activations"))
    one_input = run(unet, probe)
    assert layers[name].qweight is None and 0 < rel_error(one_input, fp) < rel_error(served, fp)
    set_mode(unet, "quant")


def test_one_forward_errors_are_split_by_quarter_of_the_time_steps():
    ref = torch.ones(4, 1, 2, 2)
    out = ref.clone()
    out[0] += 1.0  # t = 10, quarter 0 (the x_0 end): an error as large as the output itself
    row = one_forward_errors(out, ref, torch.tensor([10, 300, 600, 999]), num_train=1000)
    assert row["rel_error_by_quarter"] == [1.0, 0.0, 0.0, 0.0]
    assert row["rel_error"] == 0.25
