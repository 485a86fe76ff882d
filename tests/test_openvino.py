"""OpenVINO backend: PTQ4DM's own scales on OpenVINO's int8 CPU kernels, one conversion for every batch size."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from markers import needs_openvino
from test_execution import per_sample
from test_quantize import FAST, rel_error

from quantizer.diffusion.sampling import sample
from quantizer.execution.executor import BackendUnavailable, build_executor, resolve_backend, weight_bytes
from quantizer.execution.group_norm import ChannelGroupNorm, channelwise_group_norms
from quantizer.execution.int8_x86 import int8_supported
from quantizer.execution.openvino import (
    SAFE_WEIGHT_QMAX,
    OpenVINOUNet,
    build_openvino,
    convert,
    cpu_bf16,
    cpu_flags,
    int8_dot_products_exact,
    traceable_quantized,
    usable_cores,
)
from quantizer.ptq.calibration import CalibrationSet, build_calibration_set
from quantizer.ptq.config import CalibrationConfig, PTQ4DMConfig, QuantConfig
from quantizer.ptq.quant_modules import QuantLayer
from quantizer.ptq.quantize import quantize_

pytestmark = needs_openvino

# Same bound as int8-x86 (tests/test_execution.py): the kernels differ from the simulation only in rounding order
# (FakeQuantize's own formula, int32 accumulation). Measured on the tiny UNet: 0.013-0.017.
OPENVINO_VS_FAKE_BOUND = 0.03
# bf16 for every non-quantized op adds its rounding (as int8-bf16-x86).
OPENVINO_BF16_VS_FAKE_BOUND = 0.08


@pytest.fixture(scope="module")
def calib(tiny_unet, scheduler_config) -> CalibrationSet:
    cfg = CalibrationConfig(method="ndtc", n_samples=16, steps=10, batch_size=8, seed=0)
    return build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)


def quantized(unet: torch.nn.Module, calib: CalibrationSet, **quant: object) -> torch.nn.Module:
    return quantize_(copy.deepcopy(unet), PTQ4DMConfig(quant=QuantConfig(**quant, **FAST)), calibration=calib,
                     progress=False)


@pytest.fixture(scope="module")
def fake_w8a8(tiny_unet, calib) -> torch.nn.Module:
    return quantized(tiny_unet, calib)


@pytest.fixture(scope="module")
def fake_w4a8(tiny_unet, calib) -> torch.nn.Module:
    return quantized(tiny_unet, calib, weight_bits=4)  # first/last layers keep 8-bit weights (first_last_bits)


@pytest.fixture(scope="module")
def ov_w4a8(fake_w4a8) -> OpenVINOUNet:
    executor = build_executor(fake_w4a8, "openvino", max_batch=16)
    assert isinstance(executor, OpenVINOUNet)
    return executor


def int8_eligible(fake: torch.nn.Module) -> int:
    """Quantized layers whose weights the CPU's int8 kernels hold exactly (all of them with VNNI/AMX)."""
    return sum(1 for m in fake.modules() if isinstance(m, QuantLayer)
               and (int8_dot_products_exact() or m.weight_quantizer.qrange.qmax <= SAFE_WEIGHT_QMAX))


@pytest.mark.parametrize("precision", ["w8a8", "w7a8", "w4a8"])
def test_reproduces_fake_quant_on_int8_kernels(precision, fake_w8a8, fake_w4a8, tiny_unet, calib):
    fake = {"w8a8": fake_w8a8, "w4a8": fake_w4a8}.get(precision) or quantized(tiny_unet, calib, weight_bits=7)
    executor = build_openvino(fake, "openvino", max_batch=16, precision="f32")
    # every layer PTQ4DM quantized (and whose weights the kernels hold exactly) runs as a u8/i8 kernel
    assert executor.int8_layer_count() == int8_eligible(fake)
    if precision != "w8a8" or int8_dot_products_exact():  # 7-bit weights and less: exact without VNNI too
        assert executor.int8_layer_count() >= 40
        assert "u8" in executor.layer_precisions()["Convolution"]
    with torch.no_grad():  # the whole calibration set in one call: every image at its own timestep
        real = executor(calib.xs, calib.ts).sample
    fake_out, fp = per_sample(fake, calib), per_sample(tiny_unet, calib)
    assert rel_error(real, fake_out) < OPENVINO_VS_FAKE_BOUND
    assert rel_error(real, fake_out) < rel_error(fake_out, fp) / 2  # the quantized model, not the float one
    assert executor.compile_seconds is not None and executor.convert_seconds > 0
    assert weight_bytes(executor) < weight_bytes(tiny_unet) or not int8_dot_products_exact()


def test_symmetric_activations_run_without_zero_points(tiny_unet, calib, fake_w8a8):
    """act_symmetric: every input's zero point is mid-grid, lowered to i8 kernels, still the simulation's output."""
    fake = quantized(tiny_unet, calib, act_symmetric=True)
    layers = [m for m in fake.modules() if isinstance(m, QuantLayer)]
    assert {int(m.input_quantizer.zero_point) for m in layers} == {128}
    executor = build_openvino(fake, "openvino", max_batch=16, precision="f32")
    assert executor.int8_layer_count() == int8_eligible(fake)
    if "amx_int8" in cpu_flags():  # AMX multiplies s8 x s8: the i8 levels reach the convolutions as they are
        assert "i8" in executor.layer_precisions()["Convolution"]
        assert "u8" not in executor.layer_precisions()["Convolution"]
    # (VNNI's dot product is u8 x s8 only: there oneDNN adds 128 to i8 activations and compensates, so the
    # convolutions report u8 whatever the grid.)
    with torch.no_grad():
        real = executor(calib.xs, calib.ts).sample
    fake_out = per_sample(fake, calib)
    assert rel_error(real, fake_out) < OPENVINO_VS_FAKE_BOUND
    assert rel_error(fake_out, per_sample(fake_w8a8, calib)) > 0  # a different quantization, not the same one


@pytest.mark.skipif(not cpu_bf16(), reason="OpenVINO has no native bf16 on this CPU")
def test_bf16_elsewhere_stays_close_to_fake_quant(ov_w4a8, fake_w4a8, calib):
    assert ov_w4a8.precision == "f32"  # 'openvino' computes what the simulation does
    mixed = build_executor(fake_w4a8, "openvino-int8-bf16", max_batch=16)
    assert mixed.precision == "bf16"
    assert rel_error(per_sample(mixed, calib), per_sample(fake_w4a8, calib)) < OPENVINO_BF16_VS_FAKE_BOUND


def test_every_batch_size_runs_on_static_graphs_from_one_conversion(ov_w4a8):
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(400)
    seconds = ov_w4a8.warmup([1, 3, 16, 32])
    assert set(seconds) == {1, 3, 16}  # 32 > max_batch: split, never compiled
    assert set(ov_w4a8.static_batch_sizes) == {1, 3, 16}
    with torch.no_grad():
        alone = torch.cat([ov_w4a8(x[i:i + 1], t).sample for i in range(32)])
        for batch in (3, 16, 32):
            together = ov_w4a8(x[:batch], t).sample
            assert together.shape == (batch, 1, 16, 16)
            assert rel_error(together, alone[:batch]) < 1e-3
    assert set(ov_w4a8.static_batch_sizes) == {1, 3, 16}  # 32 ran as 2 x 16: nothing new compiled


def test_static_graphs_are_bounded_and_match_the_dynamic_graph(fake_w4a8, calib):
    lru = build_executor(fake_w4a8, "openvino", max_batch=16)
    lru.static_graphs = 2
    dynamic = build_openvino(fake_w4a8, "openvino", max_batch=16, precision="f32", static_graphs=0)
    x, t = calib.xs, calib.ts
    with torch.no_grad():
        for batch in (1, 2, 5, 2):
            static_out = lru(x[:batch], t[:batch]).sample
            # the same int8 kernels; the static graph fuses element-wise chains (measured 0.001-0.003 here)
            assert rel_error(static_out, dynamic(x[:batch], t[:batch]).sample) < 0.01
    assert lru.static_batch_sizes == [5, 2]  # least recently used first; batch 1 was evicted
    assert dynamic.static_batch_sizes == [] and dynamic.compile_seconds is not None


def test_concurrent_calls_are_independent(ov_w4a8):
    xs = [torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        serial = [ov_w4a8(x, 250).sample for x in xs]
    results: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        with torch.no_grad():
            results[i] = ov_w4a8(xs[i], 250).sample

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        assert torch.equal(results[i], serial[i])


def test_sampling_runs_and_is_deterministic_per_seed(ov_w4a8, scheduler_config):
    images = sample(ov_w4a8, scheduler_config, [5, 6, 7], sampler="ddim", steps=3, batch_size=3)
    again = sample(ov_w4a8, scheduler_config, [5, 6, 7], sampler="ddim", steps=3, batch_size=3)
    alone = sample(ov_w4a8, scheduler_config, [6], sampler="ddim", steps=3)
    assert images.shape == (3, 1, 16, 16) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, again)
    assert rel_error(images[1:2], alone) < 1e-3  # image k depends on its seed, not its batch


def test_fp32_backend_matches_eager_and_uses_the_compile_cache(tiny_unet, calib, tmp_path):
    fp = per_sample(tiny_unet, calib)
    first = build_executor(tiny_unet, "openvino-fp32", max_batch=4, cache_dir=tmp_path / "ov-cache")
    first.warmup([4])
    assert any((tmp_path / "ov-cache").iterdir())  # the compiled blob was written
    cached = build_executor(tiny_unet, "openvino-fp32", max_batch=4, cache_dir=tmp_path / "ov-cache")
    for executor in (first, cached):
        assert executor.backend == "openvino-fp32" and executor.int8_layer_count() == 0
        assert rel_error(per_sample(executor, calib), fp) < 1e-4
    assert next(tiny_unet.parameters()).dtype == torch.float32


def test_runtime_threads_follow_torchs(tiny_unet):
    """The worker's thread budget (torch_threads) binds the runtime too, unpinned when it is below the cores: two
    1-thread workers then run on two cores, not both on the first."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            executor = build_executor(tiny_unet, "openvino-fp32", max_batch=2)
            assert executor.compiled.get_property("INFERENCE_NUM_THREADS") == threads
            if threads < usable_cores():  # sharing the machine: not pinned to its first cores
                assert executor.compiled.get_property("ENABLE_CPU_PINNING") is False
    finally:
        torch.set_num_threads(before)


def test_backend_errors_are_clear(tiny_unet, fake_w8a8, calib, monkeypatch):
    with pytest.raises(BackendUnavailable, match="needs a quantized model"):
        build_executor(tiny_unet, "openvino")
    with pytest.raises(BackendUnavailable, match="runs unquantized models"):
        build_executor(fake_w8a8, "openvino-fp32")
    with pytest.raises(BackendUnavailable, match="openvino runs on the CPU"):
        resolve_backend("openvino", quantized=True, device="cuda")
    if not cpu_bf16():
        with pytest.raises(BackendUnavailable, match="no native bfloat16"):
            build_executor(tiny_unet, "openvino-bf16")
    a16 = quantized(tiny_unet, calib, act_bits=16)
    with pytest.raises(BackendUnavailable, match="activations of at most 8 bits"):
        build_executor(a16, "openvino")
    attn = quantized(tiny_unet, calib, quantize_attention_matmuls=True)
    with pytest.raises(BackendUnavailable, match="attention matmuls"):
        build_executor(attn, "openvino")
    assert resolve_backend("auto", quantized=True) == "openvino"
    assert build_executor(a16, "auto") is a16  # what openvino cannot run, auto runs as the simulation
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    with pytest.raises(BackendUnavailable, match="openvino package is not installed"):
        resolve_backend("openvino", quantized=True)
    assert resolve_backend("auto", quantized=True) == ("int8-x86" if int8_supported() is None else "fake")


@pytest.mark.parametrize("shape", [(3, 32, 5, 7), (2, 32, 9)])  # a resnet's (N, C, H, W), attention's (N, C, L)
@pytest.mark.parametrize("affine", [True, False])
def test_channel_group_norm_is_group_norm(shape, affine):
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3 + 1
    with torch.no_grad():
        assert torch.allclose(ChannelGroupNorm(norm)(x), norm(x), atol=1e-5, rtol=1e-5)


def test_int8_graphs_normalise_without_mvn_and_fp32_graphs_keep_it(fake_w8a8, tiny_unet, calib):
    """The int8 graph's GroupNorms are per-channel reductions (no MVN, so no planar reorders before them; the mean
    square a ReduceL2; both statistics' group means one small ReduceMean), with the same output; the fp32 graph
    keeps nn.GroupNorm (MVN), where it measures faster."""
    executor = build_openvino(fake_w8a8, "openvino", max_batch=16, precision="f32")
    assert "MVN" not in executor.layer_precisions()
    converted = [op.get_type_name() for op in convert(traceable_quantized(fake_w8a8)).get_ops()]
    assert "ReduceL2" in converted  # the mean square without writing x * x first
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in tiny_unet.modules())
    assert converted.count("ReduceMean") == 2 * norms  # x's channel means, then one for both statistics' groups
    assert "MVN" in build_openvino(tiny_unet, "openvino-fp32", max_batch=16, precision="f32").layer_precisions()
    plain = OpenVINOUNet(traceable_quantized(fake_w8a8, channel_group_norm=False), "openvino", "f32", 16, None)
    assert "MVN" in plain.layer_precisions()
    with torch.no_grad():
        assert rel_error(executor(calib.xs, calib.ts).sample, plain(calib.xs, calib.ts).sample) < 0.01
    assert channelwise_group_norms(copy.deepcopy(tiny_unet)) == norms
