"""Time-step-aware activation scales: one range per tensor and time-step group, weights shared, on the simulation
and on OpenVINO (one compiled graph per group)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from test_quantize import FAST, rel_error

from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.execution.executor import BackendUnavailable, build_executor
from quantizer.execution.int8_x86 import int8_supported
from quantizer.execution.openvino import OpenVINOUNet, int8_dot_products_exact
from quantizer.ptq.calibration import build_calibration_set
from quantizer.ptq.config import PTQ4DMConfig, QuantConfig
from quantizer.ptq.fake_quant import residual_step
from quantizer.ptq.pipeline import build_config, quantize_model
from quantizer.ptq.quant_modules import ActQuantizer, QuantLayer
from quantizer.ptq.quantize import quantize_, resolve_negative_indices
from quantizer.ptq.timestep_groups import TimestepGroupedUNet, group_edges, group_index, split_calibration

pytest_plugins = ["service.testing"]
GROUPED = {"method": "uniform", "n_samples": 16, "steps": 10, "batch_size": 8, "timestep_groups": 2, **FAST}


def test_groups_cut_the_training_time_steps_evenly():
    assert group_edges(1000, 4) == [0, 250, 500, 750]
    assert group_index(torch.tensor([0, 249, 250, 999]), [0, 250, 500, 750]).tolist() == [0, 0, 1, 3]
    assert group_index(torch.tensor(500), [0, 500]).item() == 1
    with pytest.raises(ValueError, match="timestep_groups"):
        group_edges(1000, 0)
    with pytest.raises(ValueError, match="timestep_groups"):
        QuantConfig(timestep_groups=0)


def test_the_default_config_hashes_as_before_groups_existed():
    """One group is the paper's method: its cache keys (and the shipped calibration) must not change."""
    assert "timestep_groups" not in build_config("w8a8").to_dict()["quant"]
    assert build_config("w8a8", {"timestep_groups": 4}).to_dict()["quant"]["timestep_groups"] == 4


@pytest.fixture(scope="module")
def grouped(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    cache = tmp_path_factory.mktemp("cache")
    return model, quantize_model(model, "w8a8", GROUPED, cache_dir=cache, progress=False), cache


def test_each_group_has_its_own_activation_ranges_on_shared_weights(grouped):
    model, q, _ = grouped
    assert isinstance(q.unet, TimestepGroupedUNet) and q.unet.edges == [0, 500]
    first, second = (dict(m.named_modules()) for m in q.unet.members)
    layers = [n for n, m in first.items() if isinstance(m, QuantLayer)]
    for name in layers:
        assert first[name].layer.weight is second[name].layer.weight  # one copy of the weights
        assert torch.equal(first[name].weight_quantizer.scale, second[name].weight_quantizer.scale)
    assert sum(float(first[n].input_quantizer.scale) != float(second[n].input_quantizer.scale) for n in layers) > 0

    # Group g's ranges are exactly a plain PTQ4DM calibration on the samples whose t falls in group g.
    config = build_config("w8a8", GROUPED)
    calib = build_calibration_set(model.unet, model.scheduler_config, config.calibration, progress=False)
    for g, part in enumerate(split_calibration(calib, q.unet.edges)):
        plain = quantize_(copy.deepcopy(model.unet), PTQ4DMConfig(quant=QuantConfig(**FAST)), calibration=part,
                          progress=False)
        member = dict(q.unet.members[g].named_modules())
        for name, module in plain.named_modules():
            if isinstance(module, QuantLayer):
                assert torch.equal(module.input_quantizer.scale, member[name].input_quantizer.scale), (g, name)


def test_a_step_runs_with_its_groups_ranges_and_a_mixed_batch_is_split(grouped):
    model, q, cache = grouped
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900, 20, 600])
    with torch.no_grad():
        mixed = q.unet(x, t).sample
        low = q.unet.members[0](x[[0, 2]], t[[0, 2]]).sample
        high = q.unet.members[1](x[[1, 3]], t[[1, 3]]).sample
        assert torch.equal(mixed[[0, 2]], low) and torch.equal(mixed[[1, 3]], high)
        assert torch.equal(q.unet(x[:1], 10).sample, q.unet.members[0](x[:1], 10).sample)
    again = quantize_model(model, "w8a8", GROUPED, cache_dir=cache, progress=False)  # from the cache
    assert again.stats_source == "cache" and again.calibration_hash == q.calibration_hash
    with torch.no_grad():
        assert torch.equal(again.unet(x, t).sample, mixed)


def test_openvino_compiles_one_graph_per_group(grouped):
    model, q, _ = grouped
    executor = build_executor(q.unet, "openvino", max_batch=8)
    assert isinstance(executor, TimestepGroupedUNet) and executor.backend == "openvino"
    assert all(isinstance(m, OpenVINOUNet) for m in executor.members)
    if int8_dot_products_exact():  # else 8-bit weights run as the exact float fallback (quantizer.execution.openvino)
        assert all(m.int8_layer_count() > 0 for m in executor.members)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for t in (30, 800):
        with torch.no_grad():
            assert rel_error(executor(x, t).sample, q.unet(x, t).sample) < 0.05
    assert build_executor(q.unet, "auto").backend == "openvino"
    assert build_executor(q.unet, "fake") is q.unet
    # int8-x86 refuses the grouped model (or, where it cannot run, the machine first, with its reason)
    reason = int8_supported()
    with pytest.raises(BackendUnavailable, match="time-step groups" if reason is None else re.escape(reason)):
        build_executor(q.unet, "int8-x86")


def test_a_group_without_calibration_samples_is_an_error(tiny_model_dir):
    model = load_model(tiny_model_dir)
    only_noise_end = {**GROUPED, "method": "single_step", "single_step_t": 900, "timestep_groups": 4}
    with pytest.raises(ValueError, match=r"timestep groups \[0, 1, 2\] get no calibration samples"):
        quantize_model(model, "w8a8", only_noise_end, progress=False)


def test_float_groups_run_the_fp_model_at_the_noise_end_on_the_same_statistics(grouped):
    model, q, cache = grouped
    mixed = quantize_model(model, "w8a8", {**GROUPED, "float_groups": 1}, cache_dir=cache, progress=False)
    assert mixed.stats_source == "cache" and mixed.calibration_hash == q.calibration_hash  # nothing recalibrated
    quantized, fp_member = mixed.unet.members
    assert any(isinstance(m, QuantLayer) for m in quantized.modules())
    assert not any(isinstance(m, QuantLayer) for m in fp_member.modules())
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(mixed.unet(x, 800).sample, model.unet(x, 800).sample)  # t >= 500: full precision
        assert torch.equal(mixed.unet(x, 30).sample, q.unet(x, 30).sample)  # t < 500: the quantized group
        executor = build_executor(mixed.unet, "openvino", max_batch=8)
        assert executor.members[1].backend == "openvino-fp32" and executor.members[0].backend == "openvino"
        assert rel_error(executor(x, 800).sample, model.unet(x, 800).sample) < 1e-4
    with pytest.raises(ValueError, match="float_groups must be < timestep_groups"):
        QuantConfig(timestep_groups=2, float_groups=2)
    assert "float_groups" not in QuantConfig().to_dict()


def test_float_groups_by_steps_gives_long_requests_more_float_groups_on_the_same_graphs(grouped):
    """At >= 20 steps the noise-end group runs the float member, below it the quantized one: the same images as the
    configs that always do, no recalibration, and on OpenVINO no extra graph (the float one is built once)."""
    model, q, cache = grouped
    by_steps = quantize_model(model, "w8a8", {**GROUPED, "float_groups_by_steps": {"20": 1}}, cache_dir=cache,
                              progress=False)
    assert by_steps.stats_source == "cache" and by_steps.calibration_hash == q.calibration_hash
    always = quantize_model(model, "w8a8", {**GROUPED, "float_groups": 1}, cache_dir=cache, progress=False)
    unet = by_steps.unet
    assert unet.for_steps(19) is unet and unet.for_steps(20) is unet.for_steps(1000)
    assert unet.for_steps(20).members[0] is unet.members[0] and unet.for_steps(20).members[1] is unet.float_member
    assert not any(isinstance(m, QuantLayer) for m in unet.float_member.modules())
    seeds = [0, 1]
    assert torch.equal(sample(unet, model.scheduler_config, seeds, steps=10),
                       sample(q.unet, model.scheduler_config, seeds, steps=10))
    assert torch.equal(sample(unet, model.scheduler_config, seeds, steps=20),
                       sample(always.unet, model.scheduler_config, seeds, steps=20))
    executor = build_executor(unet, "openvino", max_batch=8)
    assert [m.backend for m in executor.members] == ["openvino", "openvino"]
    assert executor.for_steps(20).members[1] is executor.float_member
    assert executor.float_member.backend == "openvino-fp32"
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_error(executor.for_steps(20)(x, 800).sample, model.unet(x, 800).sample) < 1e-4


def test_float_groups_by_steps_resolves_to_the_config_it_runs():
    config = build_config("w8a8", {**GROUPED, "float_groups_by_steps": {"20": 1}})
    assert config.to_dict()["quant"]["float_groups_by_steps"] == {"20": 1}  # JSON keys: what PTQ4DM_CALIBRATION takes
    assert config.for_steps(20).to_dict() == build_config("w8a8", {**GROUPED, "float_groups": 1}).to_dict()
    assert config.for_steps(19).to_dict() == build_config("w8a8", GROUPED).to_dict()
    assert config.stable_hash() != build_config("w8a8", GROUPED).stable_hash()
    assert "float_groups_by_steps" not in build_config("w8a8", GROUPED).to_dict()["quant"]
    assert QuantConfig(timestep_groups=4, float_groups_by_steps=((500, 3), (101, 2))).float_groups_by_steps == (
        (101, 2), (500, 3))
    assert QuantConfig(timestep_groups=4, float_groups=3, float_groups_by_steps={101: 2}).float_groups_for(1000) == 3
    faithful = build_config("w8a8", {"preset": "faithful"})  # what the service serves
    assert [faithful.for_steps(s).quant.float_groups for s in (25, 100, 101, 1000)] == [2, 2, 3, 3]
    for bad, match in (({"twenty": 1}, "float_groups_by_steps step count"),
                       ({"20": 2}, r"float_groups_by_steps\[20\] must be < timestep_groups"),
                       ({"0": 1}, "float_groups_by_steps step count must be an integer >= 1"),
                       ([(20, 1), ("20", 1)], "names a step count twice"),
                       ("20:1", "must map a step count to float groups")):
        with pytest.raises(ValueError, match=match):
            build_config("w8a8", {**GROUPED, "float_groups_by_steps": bad})
    with pytest.raises(ValueError, match="needs float_group_layers empty"):
        build_config("w8a8", {**GROUPED, "float_groups": 1, "float_group_layers": ["conv_in"],
                              "float_groups_by_steps": {"20": 1}})
    with pytest.raises(ValueError, match="cannot be combined with noise_correction"):
        build_config("w8a8", {**GROUPED, "noise_correction": "bias", "float_groups_by_steps": {"20": 1}})


def test_float_group_layers_keep_only_the_named_layers_float_at_the_noise_end(grouped):
    model, q, cache = grouped
    names = [n for n, m in q.unet.members[0].named_modules() if isinstance(m, QuantLayer)]
    named, others = names[1], names[:1] + names[2:]
    mixed = quantize_model(model, "w8a8", {**GROUPED, "float_groups": 1, "float_group_layers": [named]},
                           cache_dir=cache, progress=False)
    assert mixed.stats_source == "cache" and mixed.calibration_hash == q.calibration_hash  # nothing recalibrated
    high, reference = dict(mixed.unet.members[1].named_modules()), dict(q.unet.members[1].named_modules())
    assert not isinstance(high[named], QuantLayer)  # the model's own float layer, full-precision weights
    assert torch.equal(high[named].weight, model.unet.get_submodule(named).weight)
    assert all(isinstance(high[n], QuantLayer) for n in others)  # the rest int8 on the noise-end group's ranges
    assert all(float(high[n].input_quantizer.scale) == float(reference[n].input_quantizer.scale) for n in others)
    # 8 images: on a tiny random UNet one activation rounding the other way (the graph's float order is not
    # torch's) moves a single image by a few percent, so a bound on one or two images would measure luck.
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(mixed.unet(x, 30).sample, q.unet(x, 30).sample)  # t < 500: the quantized group as is
        simulated = mixed.unet(x, 800).sample
        assert not torch.equal(simulated, q.unet(x, 800).sample)
        executor = build_executor(mixed.unet, "openvino", max_batch=8)
        if int8_dot_products_exact():  # the named layer is the one the noise-end graph runs in float
            assert executor.members[1].int8_layer_count() == executor.members[0].int8_layer_count() - 1
        assert rel_error(executor(x, 800).sample, simulated) < 0.03
    with pytest.raises(ValueError, match="match no quantized layer"):
        quantize_model(model, "w8a8", {**GROUPED, "float_groups": 1, "float_group_layers": ["no_such_layer*"]},
                       cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="float_group_layers needs float_groups"):
        QuantConfig(timestep_groups=2, float_group_layers=(named,))
    assert "float_group_layers" not in QuantConfig().to_dict()


def test_negative_block_indices_name_the_same_part_of_any_unet(tiny_unet):
    last = len(tiny_unet.up_blocks) - 1
    assert resolve_negative_indices("up_blocks.-1.resnets.*.conv2", tiny_unet) == f"up_blocks.{last}.resnets.*.conv2"
    assert resolve_negative_indices("down_blocks.-2", tiny_unet) == f"down_blocks.{len(tiny_unet.down_blocks) - 2}"
    assert resolve_negative_indices("up_blocks.1.conv", tiny_unet) == "up_blocks.1.conv"  # no negative index
    for bad in ("up_blocks.-99.x", "up_blocks.-0.x", "conv_in.-1"):
        with pytest.raises(ValueError, match="the UNet has no"):
            resolve_negative_indices(bad, tiny_unet)


def test_a_residual_input_is_its_int8_grid_plus_a_second_int8_pass_over_the_rounding_residual():
    quantizer = ActQuantizer(8)
    quantizer.set_qparams(torch.tensor(0.05), torch.tensor(40))
    quantizer.mode = "quant"
    x = torch.linspace(-2.0, 10.75, 4001)  # the grid spans [-2.0, 10.75]
    plain = quantizer(x)
    quantizer.residual = True
    fine = quantizer(x)
    step = residual_step(0.05)
    assert float((plain - x).abs().max()) == pytest.approx(0.025, rel=1e-3)
    assert float((fine - x).abs().max()) <= step / 2 + 1e-6  # ~16-bit: half a step of scale / 254
    levels = (fine - plain) / step  # on the residual's s8 grid
    assert float((levels - levels.round()).abs().max()) < 1e-2 and float(levels.abs().max()) < 127.01


class _Clip(torch.nn.Module):
    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)


def clipped_inputs(member: torch.nn.Module) -> torch.nn.Module:
    """A copy of a fake-quant member whose layer inputs are clipped to their grid's range (widened by the residual
    pass's reach, half a step) but not rounded: the limit of ever finer rounding, weights as they are."""
    out = copy.deepcopy(member)
    for module in out.modules():
        if isinstance(module, QuantLayer):
            iq = module.input_quantizer
            scale, zero_point = float(iq.scale), int(iq.zero_point)
            module.input_quantizer = _Clip((iq.qrange.qmin - zero_point - 0.5) * scale,
                                           (iq.qrange.qmax - zero_point + 0.5) * scale)
    return out


def test_residual_float_groups_run_the_int8_graph_plus_a_residual_pass_at_the_noise_end(grouped):
    """The same statistics; at t >= 500 every layer input gets its second pass (closer to FP than int8 alone), on
    OpenVINO as a second int8 kernel per layer; requests that reach float_groups_by_steps run full precision."""
    model, q, cache = grouped
    mixed = quantize_model(model, "w8a8", {**GROUPED, "float_groups": 1, "float_group_mode": "residual"},
                           cache_dir=cache, progress=False)
    assert mixed.stats_source == "cache" and mixed.calibration_hash == q.calibration_hash  # nothing recalibrated
    assert mixed.unet.float_member is None  # no fp32 copy kept
    high, reference = dict(mixed.unet.members[1].named_modules()), dict(q.unet.members[1].named_modules())
    layers = [n for n, m in high.items() if isinstance(m, QuantLayer)]
    assert layers and all(high[n].input_quantizer.residual for n in layers)
    assert all(float(high[n].input_quantizer.scale) == float(reference[n].input_quantizer.scale) for n in layers)
    assert not any(m.input_quantizer.residual for m in mixed.unet.members[0].modules() if isinstance(m, QuantLayer))
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(mixed.unet(x, 30).sample, q.unet(x, 30).sample)  # t < 500: the int8 group as is
        # what the two passes approximate: each input clipped to its grid (plus the residual's half step), exact
        exact_inputs, simulated = clipped_inputs(q.unet.members[1])(x, 800).sample, mixed.unet(x, 800).sample
        assert rel_error(simulated, exact_inputs) < rel_error(q.unet(x, 800).sample, exact_inputs) / 20
        executor = build_executor(mixed.unet, "openvino", max_batch=8)
        assert [m.backend for m in executor.members] == ["openvino", "openvino"]
        if int8_dot_products_exact():  # each quantized layer runs two int8 kernels at the noise end
            assert executor.members[1].int8_layer_count() == 2 * executor.members[0].int8_layer_count()
        assert rel_error(executor(x, 800).sample, simulated) < 0.01
    by_steps = quantize_model(model, "w8a8", {**GROUPED, "float_groups": 1, "float_group_mode": "residual",
                                              "float_groups_by_steps": {"20": 1}}, cache_dir=cache, progress=False)
    assert by_steps.unet.for_steps(19) is by_steps.unet and by_steps.unet.for_steps(20).members[1] is (
        by_steps.unet.float_member)
    config = by_steps.config
    assert config.for_steps(19).quant.float_group_mode == "residual"
    assert config.for_steps(20).to_dict() == build_config("w8a8", {**GROUPED, "float_groups": 1}).to_dict()


def test_the_residual_preset_is_faithful_with_its_int8_noise_end_below_101_steps():
    residual, faithful = build_config("w8a8", {"preset": "residual"}), build_config("w8a8", {"preset": "faithful"})
    assert residual.for_steps(100).quant.float_group_mode == "residual"
    assert residual.for_steps(100).quant.float_groups == faithful.for_steps(100).quant.float_groups == 2
    assert residual.for_steps(101).to_dict() == faithful.for_steps(101).to_dict()  # DDPM-1000: t >= 250 in fp32
    assert "float_group_mode" not in faithful.to_dict()["quant"]  # the default keeps every existing hash
    short = build_config("w8a8", {"preset": "residual", "float_groups_by_steps": {"26": 2, "101": 3}})
    assert short.for_steps(25).quant.float_group_mode == "residual"
    assert all(short.for_steps(s).to_dict() == faithful.for_steps(s).to_dict() for s in (26, 100, 1000))
    for overrides, match in (({"float_group_mode": "bf16"}, "float_group_mode must be one of"),
                             ({"float_group_mode": "residual", "float_groups": 2, "float_groups_by_steps": {"20": 1}},
                              r"each pair's groups must be >= float_groups \(2\)")):
        with pytest.raises(ValueError, match=match):
            build_config("w8a8", {**GROUPED, "timestep_groups": 4, "float_groups": 1, **overrides})
