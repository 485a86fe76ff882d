from __future__ import annotations

import pytest
import torch

from quantizer.ptq.fake_quant import (
    ACT_BITS,
    WEIGHT_BITS,
    act_range,
    affine_qparams,
    channel_view,
    dequantize,
    fake_quantize,
    quantize,
    symmetric_scale,
    weight_range,
)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_weight_grid_is_symmetric_narrow_range(bits):
    qrange = weight_range(bits)
    assert qrange.qmin == -qrange.qmax == -(2 ** (bits - 1) - 1)
    assert qrange.levels == 2**bits - 1


@pytest.mark.parametrize("bits", ACT_BITS)
def test_activation_grid_is_unsigned(bits):
    qrange = act_range(bits)
    assert (qrange.qmin, qrange.qmax, qrange.levels) == (0, 2**bits - 1, 2**bits)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_per_channel_weight_round_trip(bits):
    torch.manual_seed(bits)
    qrange = weight_range(bits)
    weight = torch.randn(6, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5]).view(6, 1, 1, 1)
    absmax = weight.abs().flatten(1).amax(1)
    scale = channel_view(symmetric_scale(absmax, qrange), weight.ndim)
    assert scale.shape == (6, 1, 1, 1)
    codes = quantize(weight, scale, 0, qrange)
    assert torch.equal(codes, codes.round())
    assert codes.min() >= qrange.qmin and codes.max() <= qrange.qmax
    # Each channel's extreme value lands exactly on an end of the grid.
    assert torch.equal(codes.flatten(1).abs().amax(1), torch.full((6,), float(qrange.qmax)))
    restored = dequantize(codes, scale, 0)
    assert torch.all((restored - weight).abs() <= scale / 2 * (1 + 1e-5))
    torch.testing.assert_close(fake_quantize(weight, scale, 0, qrange), restored)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
def test_dense_weight_range_uses_every_level(bits):
    qrange = weight_range(bits)
    x = torch.linspace(-2.0, 2.0, 20 * qrange.levels).view(1, -1)
    scale = symmetric_scale(torch.tensor([2.0]), qrange).view(1, 1)
    codes = quantize(x, scale, 0, qrange)
    assert codes.unique().numel() == qrange.levels


@pytest.mark.parametrize("bits", ACT_BITS)
@pytest.mark.parametrize(("lo", "hi"), [(-1.3, 2.7), (0.0, 5.0), (-4.0, -0.5), (0.25, 3.0)])
def test_affine_activation_round_trip(bits, lo, hi):
    qrange = act_range(bits)
    scale, zero_point = affine_qparams(torch.tensor(lo), torch.tensor(hi), qrange)
    assert torch.equal(zero_point, zero_point.round())
    assert qrange.qmin <= zero_point <= qrange.qmax
    # The range always contains 0, and 0 is exact (zero padding, ReLU-like outputs).
    assert fake_quantize(torch.zeros(1), scale, zero_point, qrange).item() == 0.0
    span_lo, span_hi = min(lo, 0.0), max(hi, 0.0)
    x = torch.linspace(span_lo, span_hi, 4 * qrange.levels + 7)
    codes = quantize(x, scale, zero_point, qrange)
    assert torch.equal(codes, codes.round())
    assert codes.min() == qrange.qmin and codes.max() == qrange.qmax
    assert codes.unique().numel() == qrange.levels
    err = (dequantize(codes, scale, zero_point) - x).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-4) + 1e-6)


def test_values_outside_the_range_are_clipped_to_its_ends():
    qrange = act_range(8)
    scale, zero_point = affine_qparams(torch.tensor(-1.0), torch.tensor(1.0), qrange)
    codes = quantize(torch.tensor([-50.0, 50.0]), scale, zero_point, qrange)
    assert codes.tolist() == [qrange.qmin, qrange.qmax]
    w_range = weight_range(4)
    w_scale = symmetric_scale(torch.tensor(1.0), w_range)
    assert quantize(torch.tensor([-9.0, 9.0]), w_scale, 0, w_range).tolist() == [w_range.qmin, w_range.qmax]


def test_all_zero_channel_gets_a_usable_scale():
    qrange = weight_range(8)
    scale = symmetric_scale(torch.zeros(3), qrange)
    assert torch.all(scale > 0)
    assert torch.equal(fake_quantize(torch.zeros(3, 4), scale[:, None], 0, qrange), torch.zeros(3, 4))


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 9, 16, True, 8.0, "8"])
def test_bad_weight_bits_raise_naming_the_field(bits):
    with pytest.raises(ValueError, match="weight_bits"):
        weight_range(bits)


@pytest.mark.parametrize("bits", [4, 5, 7, 12, 32, False])
def test_bad_act_bits_raise_naming_the_field(bits):
    with pytest.raises(ValueError, match="act_bits"):
        act_range(bits)
