from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from quantizer.ptq.calibration import CalibrationSet, build_calibration_set
from quantizer.ptq.config import (
    CalibrationConfig,
    PTQ4DMConfig,
    QuantConfig,
    parse_precision,
    quant_config_for,
)
from quantizer.ptq.pipeline import build_config
from quantizer.ptq.quant_modules import ActQuantizer, QuantAttnProcessor, QuantConv2d, QuantLayer, QuantLinear
from quantizer.ptq.quantize import export_stats, load_stats, quantize_, set_mode

FAST = {"n_candidates": 20, "act_samples": 4096}


@pytest.fixture(scope="module")
def calib(tiny_unet, scheduler_config) -> CalibrationSet:
    cfg = CalibrationConfig(method="ndtc", n_samples=16, steps=10, batch_size=8, seed=0)
    return build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)


@pytest.fixture(scope="module")
def probe(tiny_unet, scheduler_config) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out UNet inputs (other seeds) to compare models on."""
    cfg = CalibrationConfig(method="uniform", n_samples=6, steps=10, batch_size=6, seed=99)
    held_out = build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    return held_out.xs, held_out.ts


def run(unet: nn.Module, probe: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(*probe).sample


def count_forwards(unet: nn.Module) -> dict[str, int]:
    calls = {"n": 0}

    def hook(_module, _args):
        calls["n"] += 1

    unet.register_forward_pre_hook(hook)
    return calls


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_every_conv_and_linear_is_wrapped_with_per_channel_weight_scales(tiny_unet, calib):
    originals = {n: m for n, m in tiny_unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unet = quantize_(copy.deepcopy(tiny_unet), QuantConfig(**FAST), calibration=calib, progress=False)
    wrapped = {n: m for n, m in unet.named_modules() if isinstance(m, QuantLayer)}
    assert wrapped.keys() == originals.keys()
    for name, layer in wrapped.items():
        original = originals[name]
        assert isinstance(layer, QuantConv2d if isinstance(original, nn.Conv2d) else QuantLinear)
        scale = layer.weight_quantizer.scale
        assert scale.shape == (original.weight.shape[0],) + (1,) * (original.weight.ndim - 1)
        assert torch.all(scale > 0)
        assert layer.mode == "quant" and layer.input_quantizer.mode == "quant"
    # No Conv2d/Linear is reachable except inside a wrapper.
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert name.endswith(".layer")


def test_quantized_layers_compute_on_the_integer_grids(tiny_unet, calib, probe):
    unet = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=6, act_bits=8, first_last_bits=None, **FAST),
                     calibration=calib, progress=False)
    seen: dict[str, torch.Tensor] = {}
    layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    layer.input_quantizer.register_forward_hook(lambda m, args, out: seen.__setitem__("x", out))
    run(unet, probe)
    q = layer.input_quantizer
    codes = seen["x"] / q.scale + q.zero_point.float()
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    assert codes.round().min() >= 0 and codes.round().max() <= 255
    weight_codes = layer.qweight / layer.weight_quantizer.scale
    torch.testing.assert_close(weight_codes, weight_codes.round(), atol=1e-4, rtol=0)
    assert weight_codes.round().abs().max() <= 31
    assert weight_codes.round().unique().numel() <= 63


def test_loading_stats_reproduces_the_calibrated_model_without_any_forward(tiny_unet, calib, probe):
    config = PTQ4DMConfig(QuantConfig(weight_bits=4, act_bits=8, quantize_attention_matmuls=True, **FAST),
                          calib.config)
    calibrated = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
    stats = export_stats(calibrated)
    assert all(t.device.type == "cpu" for t in stats.values())
    fresh = copy.deepcopy(tiny_unet)
    calls = count_forwards(fresh)
    restored = quantize_(fresh, config, stats=stats, progress=False)
    assert calls["n"] == 0
    assert torch.equal(run(restored, probe), run(calibrated, probe))
    exported_again = export_stats(restored)
    assert exported_again.keys() == stats.keys()
    assert all(torch.equal(exported_again[k], stats[k]) for k in stats)


def test_calibration_is_deterministic(tiny_unet, calib):
    config = QuantConfig(**FAST)
    a = export_stats(quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False))
    b = export_stats(quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_model_is_close_and_error_grows_with_fewer_bits(tiny_unet, calib, probe):
    reference = run(tiny_unet, probe)
    errors = {}
    for precision in ("w8a16", "w8a8", "w8a6", "w4a8"):
        config = quant_config_for(precision, **FAST)
        unet = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
        errors[precision] = rel_error(run(unet, probe), reference)
    assert 0 < errors["w8a16"] < errors["w8a8"] < errors["w8a6"]
    assert errors["w8a8"] < errors["w4a8"]
    assert errors["w8a16"] < 0.1  # a loose sanity bound: 8-bit weights barely move the output


def test_observe_and_fp_modes_leave_the_model_exact(tiny_unet, calib, probe):
    """The wrappers and the attention processor reproduce the original math when not quantizing."""
    reference = run(tiny_unet, probe)
    config = QuantConfig(quantize_attention_matmuls=True, **FAST)
    unet = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
    set_mode(unet, "fp")
    torch.testing.assert_close(run(unet, probe), reference, atol=1e-5, rtol=1e-5)
    set_mode(unet, "quant")
    assert rel_error(run(unet, probe), reference) > 0


def test_attention_matmul_quantizers(tiny_unet, calib, probe):
    config = QuantConfig(quantize_attention_matmuls=True, **FAST)
    unet = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(a.processor, QuantAttnProcessor) for a in attentions)
    probs_seen = []
    hook = attentions[0].processor.probs_quantizer.register_forward_hook(lambda m, a, out: probs_seen.append(out))
    run(unet, probe)
    hook.remove()
    q = attentions[0].processor.probs_quantizer
    assert q.zero_point.item() == 0  # probabilities are >= 0, so the grid starts at 0
    codes = probs_seen[0] / q.scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)
    stats = export_stats(unet)
    assert any(k.endswith("processor.probs_quantizer.scale") for k in stats)
    # Without the option the default processors stay.
    plain = quantize_(copy.deepcopy(tiny_unet), QuantConfig(**FAST), calibration=calib, progress=False)
    assert not any(isinstance(m, QuantAttnProcessor) for m in plain.modules())


def test_keep_first_last_and_first_last_bits(tiny_unet, calib):
    kept = quantize_(copy.deepcopy(tiny_unet), QuantConfig(keep_first_last_fp=True, **FAST), calibration=calib,
                     progress=False)
    assert type(kept.conv_in) is nn.Conv2d and type(kept.conv_out) is nn.Conv2d
    assert isinstance(kept.time_embedding.linear_1, QuantLinear)
    low = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, act_bits=6, **FAST), calibration=calib,
                    progress=False)
    for name in ("conv_in", "conv_out"):
        layer = low.get_submodule(name)
        assert int(layer.weight_quantizer.bits) == 8 and int(layer.input_quantizer.bits) == 8
    inner = low.get_submodule("down_blocks.0.resnets.0.conv1")
    assert int(inner.weight_quantizer.bits) == 4 and int(inner.input_quantizer.bits) == 6
    same = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, first_last_bits=None, **FAST),
                     calibration=calib, progress=False)
    assert int(same.conv_in.weight_quantizer.bits) == 4


def test_weight_bits_by_layer_keeps_chosen_layers_at_more_bits(tiny_unet, calib, probe):
    """Mixed precision: the matched layers' weights get their bits (first pattern wins), the rest weight_bits;
    activations keep act_bits; the empty default leaves the config hash as it was."""
    config = QuantConfig(weight_bits=4, weight_bits_by_layer={"down_blocks.0.*": 8, "down_blocks.*": 6}, **FAST)
    mixed = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
    assert int(mixed.get_submodule("down_blocks.0.resnets.0.conv1").weight_quantizer.bits) == 8
    assert int(mixed.get_submodule("down_blocks.0.resnets.0.conv1").input_quantizer.bits) == 8
    later = [m for n, m in mixed.named_modules() if n.startswith("down_blocks.1.") and isinstance(m, QuantLayer)]
    others = [m for n, m in mixed.named_modules() if n.startswith("up_blocks.") and isinstance(m, QuantLayer)]
    assert later and all(int(m.weight_quantizer.bits) == 6 for m in later)
    assert others and all(int(m.weight_quantizer.bits) == 4 for m in others)
    plain = quantize_(copy.deepcopy(tiny_unet), QuantConfig(weight_bits=4, **FAST), calibration=calib, progress=False)
    x, t = probe
    with torch.no_grad():
        ref = tiny_unet(x, t).sample
        err = {k: float((m(x, t).sample - ref).norm() / ref.norm()) for k, m in (("mixed", mixed), ("w4", plain))}
    assert err["mixed"] < err["w4"], err
    assert "weight_bits_by_layer" not in QuantConfig().to_dict()
    assert config.to_dict()["weight_bits_by_layer"] == {"down_blocks.0.*": 8, "down_blocks.*": 6}
    assert QuantConfig(**{**config.to_dict(), "skip": ()}) == config  # the cache's JSON round trip
    from quantizer.execution.openvino import openvino_unavailable

    if openvino_unavailable() is None:  # the real int8 kernels run the mixed grids as the simulation does
        from quantizer.execution.executor import build_executor

        with torch.no_grad():
            real = build_executor(mixed, "openvino")(x, t).sample
            fake = mixed(x, t).sample
        assert float((real - fake).norm() / fake.norm()) < 0.03


def test_skip_patterns_cover_the_subtree(tiny_unet, calib):
    config = QuantConfig(skip=("time_embedding", "*.time_emb_proj"), **FAST)
    unet = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
    assert type(unet.time_embedding.linear_1) is nn.Linear
    assert type(unet.time_embedding.linear_2) is nn.Linear
    assert type(unet.down_blocks[0].resnets[0].time_emb_proj) is nn.Linear
    assert isinstance(unet.down_blocks[0].resnets[0].conv1, QuantConv2d)


def test_mismatched_stats_raise_and_restore_the_model(tiny_unet, calib):
    stats = export_stats(quantize_(copy.deepcopy(tiny_unet), QuantConfig(**FAST), calibration=calib,
                                   progress=False))
    target = copy.deepcopy(tiny_unet)
    with pytest.raises(ValueError, match="bit"):
        quantize_(target, QuantConfig(weight_bits=4, first_last_bits=None, **FAST), stats=stats, progress=False)
    assert not any(isinstance(m, QuantLayer) for m in target.modules())
    broken = dict(stats)
    broken.pop(next(iter(broken)))
    with pytest.raises(ValueError, match="missing"):
        quantize_(target, QuantConfig(**FAST), stats=broken, progress=False)
    with pytest.raises(ValueError, match="missing|unexpected"):  # attention quantizers not in these stats
        quantize_(target, QuantConfig(quantize_attention_matmuls=True, **FAST), stats=stats, progress=False)
    assert all(not isinstance(m, QuantAttnProcessor) for m in target.modules())
    bad_scale = {k: (v.neg() if k.endswith("conv_in.weight_quantizer.scale") else v) for k, v in stats.items()}
    with pytest.raises(ValueError, match="scale"):
        quantize_(target, QuantConfig(**FAST), stats=bad_scale, progress=False)
    bad_zero_point = {k: (torch.tensor(300, dtype=torch.int32) if k.endswith("conv_in.input_quantizer.zero_point")
                          else v) for k, v in stats.items()}
    with pytest.raises(ValueError, match="zero_point"):
        quantize_(target, QuantConfig(**FAST), stats=bad_zero_point, progress=False)
    with pytest.raises(ValueError, match="no quantizers"):
        export_stats(target)


def test_load_stats_into_an_already_quantized_model(tiny_unet, calib, probe):
    a = quantize_(copy.deepcopy(tiny_unet), QuantConfig(**FAST), calibration=calib, progress=False)
    b = quantize_(copy.deepcopy(tiny_unet), QuantConfig(search="minmax", **FAST), calibration=calib, progress=False)
    assert not torch.equal(run(a, probe), run(b, probe))
    load_stats(b, export_stats(a))
    set_mode(b, "quant")  # recompute the cached quantized weights
    assert torch.equal(run(a, probe), run(b, probe))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"weight_bits": 3}, "weight_bits"),
    ({"weight_bits": 9}, "weight_bits"),
    ({"weight_bits": 16}, "weight_bits"),
    ({"act_bits": 4}, "act_bits"),
    ({"act_bits": 7}, "act_bits"),
    ({"act_bits": 32}, "act_bits"),
    ({"metric": "l3"}, "metric"),
    ({"search": "percentile"}, "search"),
    ({"p": 0}, "p"),
    ({"n_candidates": 0}, "n_candidates"),
    ({"act_samples": 0}, "act_samples"),
    ({"first_last_bits": 5}, "first_last_bits"),
    ({"skip": "conv_in"}, "skip"),
    ({"keep_first_last_fp": 1}, "keep_first_last_fp"),
    ({"weight_bits_by_layer": {"mid_block.*": 3}}, "weight_bits_by_layer"),
    ({"weight_bits_by_layer": {"": 8}}, "weight_bits_by_layer"),
    ({"weight_bits_by_layer": 8}, "weight_bits_by_layer"),
])
def test_quant_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


def test_precision_presets():
    assert parse_precision("w8a8") == (8, 8)
    assert parse_precision("w4a8") == (4, 8)
    assert parse_precision("w8a6") == (8, 6)
    assert parse_precision("W8A16") == (8, 16)
    assert parse_precision("fp32") is None
    assert quant_config_for("fp32") is None
    config = quant_config_for("w4a8", metric="mse")
    assert (config.weight_bits, config.act_bits, config.metric) == (4, 8, "mse")
    with pytest.raises(ValueError, match="weight_bits"):
        parse_precision("w2a8")
    with pytest.raises(ValueError, match="act_bits"):
        parse_precision("w8a4")
    with pytest.raises(ValueError, match="precision"):
        parse_precision("int8")


def test_build_config_from_overrides():
    config = build_config("w4a8", {"mu": 0.3, "n_samples": 64, "metric": "mse", "calibration": {"sigma": 0.2}})
    assert (config.quant.weight_bits, config.quant.act_bits, config.quant.metric) == (4, 8, "mse")
    assert (config.calibration.mu, config.calibration.sigma, config.calibration.n_samples) == (0.3, 0.2, 64)
    assert build_config("w8a8", CalibrationConfig(seed=3)).calibration.seed == 3
    assert build_config("fp32", {"mu": 0.3}) is None
    with pytest.raises(ValueError, match="unknown override"):
        build_config("w8a8", {"mean": 0.3})
    with pytest.raises(ValueError, match="weight_bits"):
        build_config("w8a8", {"weight_bits": 4})
    with pytest.raises(ValueError, match="mu"):
        build_config("w8a8", {"mu": 3})


def test_config_hash_is_stable_and_sensitive():
    a = PTQ4DMConfig(QuantConfig(skip=["conv_in"]), CalibrationConfig())
    b = PTQ4DMConfig(QuantConfig(skip=("conv_in",)), CalibrationConfig())
    assert a.stable_hash() == b.stable_hash() and len(a.stable_hash()) == 64
    assert PTQ4DMConfig().stable_hash() != PTQ4DMConfig(QuantConfig(act_bits=16)).stable_hash()
    assert PTQ4DMConfig().stable_hash() != PTQ4DMConfig(calibration=CalibrationConfig(mu=0.3)).stable_hash()
    assert PTQ4DMConfig().to_dict()["calibration"]["mu"] == 0.4


def test_bad_arguments_raise(tiny_unet, calib):
    with pytest.raises(TypeError, match="config"):
        quantize_(copy.deepcopy(tiny_unet), {"weight_bits": 8}, calibration=calib)
    with pytest.raises(TypeError, match="unet"):
        quantize_("unet", QuantConfig(), calibration=calib)
    with pytest.raises(ValueError, match="calibration"):
        quantize_(copy.deepcopy(tiny_unet), QuantConfig())
    done = quantize_(copy.deepcopy(tiny_unet), QuantConfig(**FAST), calibration=calib, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(done, QuantConfig(), calibration=calib)


def test_unsupported_layer_types_raise_unless_skipped():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 1, 3))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        quantize_(model, QuantConfig(), stats={})
    assert type(model[0]) is nn.Conv2d

    class CustomConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="CustomConv"):
        quantize_(nn.Sequential(CustomConv(1, 1, 1)), QuantConfig(), stats={})
    stats = {"0.weight_quantizer.scale": torch.ones(4, 1, 1, 1), "0.weight_quantizer.bits": torch.tensor(8),
             "0.input_quantizer.scale": torch.tensor(0.1), "0.input_quantizer.zero_point": torch.tensor(3),
             "0.input_quantizer.bits": torch.tensor(8)}
    quantize_(model, QuantConfig(skip=("1",)), stats=stats)
    assert isinstance(model[0], QuantConv2d) and type(model[1]) is nn.ConvTranspose2d
    assert model(torch.zeros(1, 1, 5, 5)).shape == (1, 1, 5, 5)


def test_a_layer_shared_by_two_parents_is_wrapped_once_everywhere(calib):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            conv = nn.Conv2d(1, 1, 3, padding=1)
            self.a, self.b = nn.Sequential(conv), nn.Sequential(conv)

        def forward(self, x, t):
            return self.b(self.a(x))

    model = Shared()
    quantize_(model, QuantConfig(**FAST), calibration=calib, progress=False)
    assert isinstance(model.a[0], QuantConv2d) and model.a[0] is model.b[0]


def test_unused_quantizer_warns_and_keeps_defaults(calib):
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(1, 1, 1)
            self.unused = nn.Linear(2, 2)

        def forward(self, x, t):
            return self.used(x)

    model = TwoPaths()
    with pytest.warns(RuntimeWarning, match="unused.input_quantizer saw no activations"):
        quantize_(model, QuantConfig(**FAST), calibration=calib, progress=False)
    assert isinstance(model.unused.input_quantizer, ActQuantizer)
    assert model.unused.input_quantizer.scale.item() == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantize_on_cuda_matches_cpu(tiny_unet, calib, probe):
    config = QuantConfig(**FAST)
    cpu = quantize_(copy.deepcopy(tiny_unet), config, calibration=calib, progress=False)
    gpu = quantize_(copy.deepcopy(tiny_unet).cuda(), config, stats=export_stats(cpu), progress=False)
    out = run(gpu, (probe[0].cuda(), probe[1].cuda())).cpu()
    torch.testing.assert_close(out, run(cpu, probe), atol=1e-3, rtol=1e-3)
