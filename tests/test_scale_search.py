from __future__ import annotations

import pytest
import torch

from quantizer.ptq.config import QuantConfig
from quantizer.ptq.fake_quant import act_range, affine_qparams, fake_quantize, symmetric_scale, weight_range
from quantizer.ptq.scale_search import (
    METRICS,
    candidate_fractions,
    quant_error,
    search_act_qparams,
    search_weight_scale,
)


def heavy_tailed(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian bulk plus a few large outliers: the case where clipping beats min/max."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    outliers = torch.rand(shape, generator=gen) < 0.002
    return torch.where(outliers, x * 25, x)


def weight_error(weight: torch.Tensor, scale: torch.Tensor, bits: int, metric: str) -> torch.Tensor:
    flat = weight.reshape(weight.shape[0], -1)
    qrange = weight_range(bits)
    return quant_error(flat, fake_quantize(flat, scale[:, None], 0, qrange), metric)


def act_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, metric: str) -> float:
    row = x.reshape(1, -1)
    return quant_error(row, fake_quantize(row, scale, zero_point, act_range(bits)), metric).item()


def test_candidates_span_one_percent_to_full_range():
    fractions = candidate_fractions(100)
    assert fractions.numel() == 100
    assert fractions[0].item() == 1.0
    assert fractions[-1].item() == pytest.approx(0.01)
    assert torch.all(fractions[:-1] > fractions[1:])
    assert candidate_fractions(1).tolist() == [1.0]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_search_never_worse_than_minmax(metric, bits):
    weight = heavy_tailed((16, 8, 3, 3), seed=bits)
    minmax = search_weight_scale(weight, bits, metric=metric, method="minmax")
    searched = search_weight_scale(weight, bits, metric=metric)
    assert searched.shape == (16,)
    assert torch.all(weight_error(weight, searched, bits, metric) <= weight_error(weight, minmax, bits, metric))


@pytest.mark.parametrize("metric", ["lp", "mse", "l1"])
def test_weight_search_clips_gaussian_tails_and_strictly_improves(metric):
    # At 4 bits the best clip of a Gaussian lies well inside its max: the search must find a tighter range.
    weight = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))
    minmax = search_weight_scale(weight, 4, metric=metric, method="minmax")
    searched = search_weight_scale(weight, 4, metric=metric)
    assert torch.all(searched < minmax)
    assert torch.all(weight_error(weight, searched, 4, metric) < weight_error(weight, minmax, 4, metric))


def test_weight_minmax_is_absmax_over_qmax():
    weight = heavy_tailed((5, 7), seed=2)
    expected = symmetric_scale(weight.abs().amax(1), weight_range(8))
    torch.testing.assert_close(search_weight_scale(weight, 8, method="minmax"), expected)
    torch.testing.assert_close(search_weight_scale(weight, 8, n_candidates=1), expected)


def test_vectorised_weight_search_equals_channel_by_channel():
    weight = heavy_tailed((12, 5, 3, 3), seed=3) * torch.logspace(-2, 1, 12).view(12, 1, 1, 1)
    together = search_weight_scale(weight, 6, n_candidates=40)
    one_by_one = torch.cat([search_weight_scale(weight[c: c + 1], 6, n_candidates=40) for c in range(12)])
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_weight_search_returns_the_grid_argmin(metric):
    weight = heavy_tailed((4, 300), seed=4)
    qrange = weight_range(5)
    absmax = weight.abs().amax(1)
    errors = torch.stack([
        quant_error(weight, fake_quantize(weight, symmetric_scale(absmax * a, qrange)[:, None], 0, qrange), metric)
        for a in candidate_fractions(30).tolist()
    ])  # candidates x channels
    searched = search_weight_scale(weight, 5, metric=metric, n_candidates=30)
    torch.testing.assert_close(weight_error(weight, searched, 5, metric), errors.min(0).values)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("bits", [6, 8, 16])
def test_activation_search_never_worse_than_minmax(metric, bits):
    x = heavy_tailed((20000,), seed=5).abs() - 0.3  # skewed, mostly positive like post-SiLU activations
    minmax = search_act_qparams(x, bits, metric=metric, method="minmax")
    searched = search_act_qparams(x, bits, metric=metric, n_candidates=50)
    assert act_error(x, *searched, bits, metric) <= act_error(x, *minmax, bits, metric)


def test_activation_search_improves_on_outliers_and_returns_integer_zero_point():
    x = heavy_tailed((50000,), seed=6)
    minmax = search_act_qparams(x, 6, method="minmax")
    scale, zero_point = search_act_qparams(x, 6)
    assert scale < minmax[0]
    assert zero_point == zero_point.round() and 0 <= zero_point <= 63
    assert act_error(x, scale, zero_point, 6, "lp") < act_error(x, *minmax, 6, "lp")


def test_activation_minmax_uses_given_exact_extremes():
    x = torch.linspace(-1.0, 2.0, 1000)
    scale, zero_point = search_act_qparams(x, 8, method="minmax", lo=-3.0, hi=5.0)
    expected = affine_qparams(torch.tensor(-3.0), torch.tensor(5.0), act_range(8))
    torch.testing.assert_close((scale, zero_point), expected)
    # Without them the sample's own extremes are used.
    own = search_act_qparams(x, 8, method="minmax")
    torch.testing.assert_close(own, affine_qparams(torch.tensor(-1.0), torch.tensor(2.0), act_range(8)))


def test_metrics_measure_distance():
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(7))
    for metric in METRICS:
        assert torch.allclose(quant_error(x, x.clone(), metric), torch.zeros(3), atol=1e-6), metric
        noisy = x + 0.3 * torch.randn(3, 500, generator=torch.Generator().manual_seed(8))
        assert torch.all(quant_error(x, noisy, metric) > 0), metric
    torch.testing.assert_close(quant_error(x, x + 0.5, "lp", p=2.4), torch.full((3,), 0.5**2.4))
    torch.testing.assert_close(quant_error(x, x + 0.5, "mse"), torch.full((3,), 0.25))
    torch.testing.assert_close(quant_error(x, x - 0.5, "l1"), torch.full((3,), 0.5))
    torch.testing.assert_close(quant_error(x, 2 * x, "cosine"), torch.zeros(3), atol=1e-6, rtol=0)


def test_unknown_metric_or_method_raises():
    with pytest.raises(ValueError, match="metric"):
        search_weight_scale(torch.randn(2, 3), 8, metric="l3")
    with pytest.raises(ValueError, match="search"):
        search_act_qparams(torch.randn(10), 8, method="percentile")
    with pytest.raises(ValueError, match="weight_bits"):
        search_weight_scale(torch.randn(2, 3), 3)
    with pytest.raises(ValueError, match="act_bits"):
        search_act_qparams(torch.randn(10), 4)


@pytest.mark.parametrize("bits", [6, 8])
def test_symmetric_activation_search_centres_the_grid_on_zero(bits):
    x = heavy_tailed((20000,), seed=7).abs() - 0.3  # one-sided: the asymmetric range would fit it better
    qrange = act_range(bits)
    minmax = search_act_qparams(x, bits, method="minmax", symmetric=True)
    scale, zero_point = search_act_qparams(x, bits, n_candidates=50, symmetric=True)
    middle = (qrange.qmin + qrange.qmax + 1) // 2  # 128 at 8 bits: an i8 grid
    assert int(zero_point) == int(minmax[1]) == middle
    # the full range covers max(|lo|, hi) on the positive side, which is the larger here
    torch.testing.assert_close(minmax[0] * (qrange.qmax - middle), x.max().clamp(min=-x.min()))
    assert act_error(x, scale, zero_point, bits, "lp") <= act_error(x, *minmax, bits, "lp")
    # the price of symmetry on a one-sided input: never better than the asymmetric search
    assert act_error(x, *search_act_qparams(x, bits, n_candidates=50), bits, "lp") <= act_error(
        x, scale, zero_point, bits, "lp")


def test_symmetric_activations_are_an_option_outside_the_default_hash():
    assert "act_symmetric" not in QuantConfig().to_dict()  # caches made before the option keep their keys
    assert QuantConfig(act_symmetric=True).to_dict()["act_symmetric"] is True
    assert QuantConfig(**QuantConfig(act_symmetric=True).to_dict()).act_symmetric  # the cache's JSON round trip
    with pytest.raises(ValueError, match="act_symmetric"):
        QuantConfig(act_symmetric="yes")
