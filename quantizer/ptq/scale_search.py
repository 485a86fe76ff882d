"""Clipping-range search: pick the quantization range that minimises a distance between x and q(x).

PTQ4DM (following QDrop/BRECQ) does not use the raw min/max: clipping a few outliers buys a finer grid for the
bulk of the values. Candidates are fractions alpha of the full range, linearly spaced in [0.01, 1]; alpha = 1
is the plain min/max range, so the search can never do worse than min/max under its own metric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantizer.ptq.fake_quant import (
    act_range,
    affine_qparams,
    fake_quantize,
    symmetric_act_qparams,
    symmetric_scale,
    weight_range,
)

METRICS: tuple[str, ...] = ("lp", "mse", "l1", "cosine", "kl")
SEARCH_METHODS: tuple[str, ...] = ("grid", "minmax")
MIN_FRACTION = 0.01
KL_BINS = 256
_KL_EPS = 1e-10


def candidate_fractions(n_candidates: int) -> torch.Tensor:
    """Fractions of the full range to try, largest first (ties then keep the wider, safer range)."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    if n_candidates == 1:
        return torch.ones(1)
    fractions = torch.linspace(MIN_FRACTION, 1.0, n_candidates, dtype=torch.float64)
    fractions[-1] = 1.0
    return fractions.flip(0).float()


def quant_error(x: torch.Tensor, xq: torch.Tensor, metric: str = "lp", p: float = 2.4) -> torch.Tensor:
    """Distance between rows of x and xq (R x K -> R); one row per channel, or a single row per tensor.

    lp: mean |x - q|^p (the paper's metric, p = 2.4); mse: p = 2; l1: p = 1; cosine: 1 - cos(x, q);
    kl: KL(P || Q) between histograms of x and q over x's own range.
    """
    if metric == "lp":
        return (x - xq).abs().pow(p).mean(1)
    if metric == "mse":
        return (x - xq).pow(2).mean(1)
    if metric == "l1":
        return (x - xq).abs().mean(1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(x, xq, dim=1, eps=1e-12)
    if metric == "kl":
        return _histogram_kl(x, xq)
    raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")


def _histogram_kl(x: torch.Tensor, xq: torch.Tensor, bins: int = KL_BINS) -> torch.Tensor:
    """Row-wise KL between KL_BINS-bin histograms; vectorised over rows with scatter_add, smoothed by _KL_EPS.

    It sees both failure modes of a range: clipping piles mass into the edge bins, and a coarse grid collapses
    the histogram onto few bins.
    """
    lo = x.amin(1, keepdim=True)
    width = (x.amax(1, keepdim=True) - lo).clamp_min(torch.finfo(x.dtype).tiny)

    def hist(v: torch.Tensor) -> torch.Tensor:
        idx = ((v - lo) / width * bins).floor().clamp(0, bins - 1).long()
        counts = torch.zeros(v.shape[0], bins, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, idx, torch.ones_like(v))
        probs = counts / counts.sum(1, keepdim=True) + _KL_EPS
        return probs / probs.sum(1, keepdim=True)

    p_hist, q_hist = hist(x), hist(xq)
    return (p_hist * (p_hist / q_hist).log()).sum(1)


def _check(metric: str, method: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if method not in SEARCH_METHODS:
        raise ValueError(f"search must be one of {', '.join(SEARCH_METHODS)}, got {method!r}")


@torch.no_grad()
def search_weight_scale(weight: torch.Tensor, bits: int, metric: str = "lp", p: float = 2.4,
                        n_candidates: int = 100, method: str = "grid") -> torch.Tensor:
    """Per-output-channel symmetric scales, shape (C_out,), float32.

    Every candidate is evaluated for all channels at once (one fake-quant of the whole weight per candidate);
    each channel keeps its own best candidate.
    """
    _check(metric, method)
    qrange = weight_range(bits)
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    absmax = flat.abs().amax(1)
    if method == "minmax":
        return symmetric_scale(absmax, qrange)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = symmetric_scale(absmax, qrange)
    for alpha in candidate_fractions(n_candidates).tolist():
        scale = symmetric_scale(absmax * alpha, qrange)
        err = quant_error(flat, fake_quantize(flat, scale[:, None], 0, qrange), metric, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


@torch.no_grad()
def search_act_qparams(values: torch.Tensor, bits: int, metric: str = "lp", p: float = 2.4,
                       n_candidates: int = 100, method: str = "grid", lo: float | None = None,
                       hi: float | None = None, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric (scale, zero_point) as 0-dim float32 tensors.

    `values` is the (sub)sample the error is measured on; `lo`/`hi` are the exact extremes seen during
    calibration (they may lie outside a subsample) and default to the sample's own. Candidates shrink
    [min(lo, 0), max(hi, 0)] towards 0 by the same factor on both sides. symmetric: candidates shrink
    [-m, m] with m = max(|lo|, hi), the zero point fixed mid-grid (QuantConfig.act_symmetric).
    """
    _check(metric, method)
    qrange = act_range(bits)
    row = values.detach().float().reshape(1, -1)
    if row.numel() == 0:
        raise ValueError("cannot search activation parameters on an empty sample")
    lo_t = torch.as_tensor(row.min().item() if lo is None else lo, dtype=torch.float32, device=row.device)
    hi_t = torch.as_tensor(row.max().item() if hi is None else hi, dtype=torch.float32, device=row.device)
    lo_t, hi_t = lo_t.clamp(max=0.0), hi_t.clamp(min=0.0)
    if symmetric:
        threshold = torch.maximum(-lo_t, hi_t)

        def qparams(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
            return symmetric_act_qparams(threshold * alpha, qrange)
    else:
        def qparams(alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
            return affine_qparams(lo_t * alpha, hi_t * alpha, qrange)
    best = qparams(1.0)
    if method == "minmax":
        return best
    best_err = float("inf")
    for alpha in candidate_fractions(n_candidates).tolist():
        scale, zero_point = qparams(alpha)
        err = quant_error(row, fake_quantize(row, scale, zero_point, qrange), metric, p).item()
        if err < best_err:
            best_err, best = err, (scale, zero_point)
    return best
