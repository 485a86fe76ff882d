"""split_concat: one activation range per half of a skip concat, on the simulation, OpenVINO and the cache."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from markers import needs_openvino
from test_execution import per_sample
from test_openvino import OPENVINO_VS_FAKE_BOUND
from test_quantize import FAST, rel_error
from torch import nn

from quantizer.diffusion.models import load_model
from quantizer.execution.executor import BackendUnavailable, build_executor
from quantizer.execution.int8_x86 import check_int8_grid
from quantizer.execution.openvino import OpenVINOUNet, build_openvino, int8_dot_products_exact, runtime_layers
from quantizer.ptq.calibration import CalibrationSet, build_calibration_set
from quantizer.ptq.concat_split import split_inputs
from quantizer.ptq.config import CalibrationConfig, PTQ4DMConfig, QuantConfig
from quantizer.ptq.fake_quant import fake_quantize
from quantizer.ptq.pipeline import build_config, cache_key_parts, quantize_model
from quantizer.ptq.quant_modules import ActQuantizer, QuantLayer, SplitActQuantizer
from quantizer.ptq.quantize import export_stats, quantize_
from quantizer.ptq.timestep_groups import TimestepGroupedUNet

pytest_plugins = ["service.testing"]

# The tiny UNet's up blocks (tests/conftest.py, block_out_channels (8, 16)): resnet i of each block is fed
# cat([decoder features, encoder skip]); the first half is what the previous resnet (or block) put out.
EXPECTED_SPLITS = {"up_blocks.0.resnets.0.conv_shortcut": 16, "up_blocks.0.resnets.1.conv_shortcut": 16,
                   "up_blocks.1.resnets.0.conv_shortcut": 16, "up_blocks.1.resnets.1.conv_shortcut": 8}
# The range test compares searched ranges with each other, so the search sees every value with the full grid
# (FAST's 4096-value subsample and 20 candidates are noisier than the difference on a random tiny UNet).
EXACT = {"act_samples": 2**17, "n_candidates": 100}
GROUPED = {"method": "uniform", "n_samples": 16, "steps": 10, "batch_size": 8, "timestep_groups": 2, **FAST}


@pytest.fixture(scope="module")
def calib(tiny_unet, scheduler_config) -> CalibrationSet:
    cfg = CalibrationConfig(method="ndtc", n_samples=16, steps=10, batch_size=8, seed=0)
    return build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)


def quantized(unet: nn.Module, calib: CalibrationSet, **quant: object) -> nn.Module:
    return quantize_(copy.deepcopy(unet), PTQ4DMConfig(quant=QuantConfig(**quant, **EXACT)), calibration=calib,
                     progress=False)


@pytest.fixture(scope="module")
def split_w8a8(tiny_unet, calib) -> nn.Module:
    return quantized(tiny_unet, calib, split_concat=True)


@pytest.fixture(scope="module")
def plain_w8a8(tiny_unet, calib) -> nn.Module:
    return quantized(tiny_unet, calib)


def split_layers(unet: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, QuantLayer) and isinstance(m.input_quantizer, SplitActQuantizer)}


def layer_inputs(unet: nn.Module, names: list[str], calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """The full-precision inputs of `names` over the calibration set."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [unet.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].clone()))
               for n in names]
    with torch.no_grad():
        for xs, ts in calib.batches():
            unet(xs, ts)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_the_default_config_is_unchanged_and_splits_nothing(plain_w8a8, tiny_model_dir):
    assert QuantConfig().split_concat is False
    assert "split_concat" not in build_config("w8a8").to_dict()["quant"]
    assert "split_concat" not in build_config("w8a8", {"preset": "recommended"}).to_dict()["quant"]
    assert not split_layers(plain_w8a8)
    assert not any(".split" in key for key in export_stats(plain_w8a8))
    model = load_model(tiny_model_dir)
    split = build_config("w8a8", {"preset": "recommended", "split_concat": True})
    assert split.to_dict()["quant"]["split_concat"] is True  # so it enters the calibration-cache key
    assert cache_key_parts(model, split) != cache_key_parts(model, build_config("w8a8", {"preset": "recommended"}))
    with pytest.raises(ValueError, match="split_concat must be a bool"):
        QuantConfig(split_concat=1)


def test_the_skip_concat_inputs_get_two_ranges_that_each_fit_their_half_better(split_w8a8, plain_w8a8, tiny_unet,
                                                                                 calib):
    layers = split_layers(split_w8a8)
    assert {n: int(m.input_quantizer.split) for n, m in layers.items()} == EXPECTED_SPLITS
    # conv1 sees the concat only after GroupNorm + SiLU: one range, as before
    assert isinstance(split_w8a8.get_submodule("up_blocks.0.resnets.0.conv1").input_quantizer, ActQuantizer)
    inputs = layer_inputs(tiny_unet, list(layers), calib)
    for name, layer in layers.items():
        iq, plain = layer.input_quantizer, plain_w8a8.get_submodule(name)
        assert (float(iq.first.scale), int(iq.first.zero_point)) != (float(iq.second.scale),
                                                                     int(iq.second.zero_point))
        x, k = inputs[name], int(iq.split)
        one = plain.input_quantizer
        for part, half in ((iq.first, x[:, :k]), (iq.second, x[:, k:])):
            own = (fake_quantize(half, part.scale, part.zero_point, part.qrange) - half).abs().pow(2.4).mean()
            shared = (fake_quantize(half, one.scale, one.zero_point, one.qrange) - half).abs().pow(2.4).mean()
            assert own <= shared, (name, part)
        with torch.no_grad():  # the layer's output error on the calibration inputs
            reference = layer.layer(x)
            split_error = (layer(x) - reference).pow(2).mean()
            plain_error = (plain(x) - reference).pow(2).mean()
        assert split_error < plain_error, name


def test_the_simulation_quantizes_each_half_with_its_own_range(split_w8a8, calib):
    layer = split_w8a8.get_submodule("up_blocks.1.resnets.1.conv_shortcut")
    iq = layer.input_quantizer
    x = torch.randn(2, layer.layer.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    out = iq(x)
    assert torch.equal(out[:, :8], fake_quantize(x[:, :8], iq.first.scale, iq.first.zero_point, iq.qrange))
    assert torch.equal(out[:, 8:], fake_quantize(x[:, 8:], iq.second.scale, iq.second.zero_point, iq.qrange))
    with pytest.raises(ValueError, match="outside its 32 channels"):
        split_inputs(copy.deepcopy(split_w8a8), {"up_blocks.0.resnets.0.conv1": 32})
    with pytest.raises(ValueError, match="not a quantized Conv2d"):
        split_inputs(copy.deepcopy(split_w8a8), {"time_embedding": 4})


def test_stats_round_trip_and_must_match_the_config(split_w8a8, tiny_unet, calib):
    stats = export_stats(split_w8a8)
    assert {k.removesuffix(".input_quantizer.split"): int(v) for k, v in stats.items()
            if k.endswith(".split")} == EXPECTED_SPLITS
    loaded = quantize_(copy.deepcopy(tiny_unet), QuantConfig(split_concat=True), stats=stats, progress=False)
    assert torch.equal(per_sample(loaded, calib), per_sample(split_w8a8, calib))
    with pytest.raises(ValueError, match="unexpected"):  # split stats into an unsplit model
        quantize_(copy.deepcopy(tiny_unet), QuantConfig(), stats=stats, progress=False)


@pytest.fixture(scope="module")
def grouped(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    cache = tmp_path_factory.mktemp("cache")
    return model, quantize_model(model, "w8a8", {**GROUPED, "split_concat": True}, cache_dir=cache,
                                 progress=False), cache


def test_time_step_groups_get_a_pair_of_ranges_each_and_the_cache_round_trips_them(grouped):
    model, q, cache = grouped
    assert isinstance(q.unet, TimestepGroupedUNet) and q.stats_source == "calibrated"
    first, second = (split_layers(m) for m in q.unet.members)
    assert {n: int(m.input_quantizer.split) for n, m in first.items()} == EXPECTED_SPLITS
    assert first.keys() == second.keys()
    assert any(float(first[n].input_quantizer.second.scale) != float(second[n].input_quantizer.second.scale)
               for n in first)
    again = quantize_model(model, "w8a8", {**GROUPED, "split_concat": True}, cache_dir=cache, progress=False)
    assert again.stats_source == "cache" and again.calibration_hash == q.calibration_hash
    x, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900, 20, 600])
    with torch.no_grad():
        assert torch.equal(again.unet(x, t).sample, q.unet(x, t).sample)
    plain = quantize_model(model, "w8a8", GROUPED, cache_dir=cache, progress=False)  # another cache entry
    assert plain.stats_source == "calibrated" and plain.cache_key != q.cache_key
    assert not any(split_layers(m) for m in plain.unet.members)


def split_kernels() -> dict[str, list[str]]:
    """What each split layer's two convolutions run as: u8 kernels, or, on a CPU without VNNI/AMX (whose u8 x s8
    kernels saturate with 8-bit weights), the exact float fallback (quantizer.execution.openvino)."""
    precision = "u8" if int8_dot_products_exact() else "f32"
    return {layer: [precision, precision] for layer in EXPECTED_SPLITS}


def split_conv_precisions(executor: OpenVINOUNet) -> dict[str, list[str]]:
    """Runtime precisions of the convolutions OpenVINO runs for each split layer."""
    found: dict[str, list[str]] = {}
    for name, layer_type, precision in runtime_layers(executor.compiled):
        for layer in EXPECTED_SPLITS:
            if f".{layer}/" in name and layer_type == "Convolution":
                found.setdefault(layer, []).append(precision)
    return found


@needs_openvino
def test_openvino_runs_each_half_as_a_u8_convolution_and_matches_the_simulation(split_w8a8, tiny_unet, calib):
    executor = build_openvino(split_w8a8, "openvino", max_batch=16, precision="f32")
    assert split_conv_precisions(executor) == split_kernels()
    with torch.no_grad():
        real = executor(calib.xs, calib.ts).sample
    fake, fp = per_sample(split_w8a8, calib), per_sample(tiny_unet, calib)
    assert rel_error(real, fake) < OPENVINO_VS_FAKE_BOUND
    assert rel_error(real, fake) < rel_error(fake, fp) / 2  # the quantized model, not the float one


@needs_openvino
def test_openvino_runs_grouped_split_models(grouped):
    _, q, _ = grouped
    executor = build_executor(q.unet, "openvino", max_batch=8)
    assert all(split_conv_precisions(m) == split_kernels() for m in executor.members)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for t in (30, 800):
        with torch.no_grad():
            assert rel_error(executor(x, t).sample, q.unet(x, t).sample) < OPENVINO_VS_FAKE_BOUND


def test_int8_x86_refuses_split_inputs_and_auto_falls_back(split_w8a8, monkeypatch):
    with pytest.raises(ValueError, match="split_concat=True.*'openvino' or 'fake'"):
        check_int8_grid(split_w8a8)
    with pytest.raises((ValueError, BackendUnavailable), match="split_concat|unavailable"):
        build_executor(split_w8a8, "int8-x86")
    monkeypatch.setitem(sys.modules, "openvino", None)  # auto without openvino: the simulation, not int8-x86
    assert build_executor(split_w8a8, "auto") is split_w8a8


def test_a_class_conditional_unet_finds_its_splits_with_its_labels(tmp_path):
    """The split-point forward passes the calibration sample's class label like every other calibration forward."""
    from diffusers import UNet2DModel

    from quantizer.ptq.calibration import build_calibration_set
    from quantizer.ptq.config import CalibrationConfig, PTQ4DMConfig, QuantConfig
    from quantizer.ptq.quant_modules import SplitActQuantizer
    from quantizer.ptq.quantize import quantize_

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=3).eval()
    scheduler = {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                 "prediction_type": "epsilon", "clip_sample": True}
    calib = build_calibration_set(unet, scheduler, CalibrationConfig(method="uniform", n_samples=4, steps=4,
                                                                      batch_size=4), progress=False)
    assert calib.class_labels is not None
    quant = QuantConfig(split_concat=True, n_candidates=10, act_samples=4096)
    quantized = quantize_(unet, PTQ4DMConfig(quant=quant), calibration=calib, progress=False)
    assert any(isinstance(m, SplitActQuantizer) for m in quantized.modules())
