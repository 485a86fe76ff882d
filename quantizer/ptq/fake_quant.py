"""Uniform quantize-dequantize ("fake quant") primitives: simulate integer arithmetic in float tensors.

Two grids are used, chosen so the parameters map onto x86 int8 kernels (s8 weights x u8 activations) later:

* weights: symmetric, per output channel, zero_point 0, integers in the *narrow* range [-(2^(b-1)-1), 2^(b-1)-1]
  (2^b - 1 levels). Narrow because a symmetric clip threshold then lands exactly on both ends of the grid;
  the extra -2^(b-1) code would only ever be reached by the negative side and buys nothing.
* activations: asymmetric, per tensor, unsigned integers in [0, 2^b - 1] with an integer zero_point, so real 0
  (conv zero-padding, post-SiLU values near 0, attention probabilities) is exactly representable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WEIGHT_BITS: tuple[int, ...] = (4, 5, 6, 7, 8)
ACT_BITS: tuple[int, ...] = (6, 8, 16)
# Smallest scale handed out: an all-zero channel still gets a valid (non-zero) scale and quantizes to 0.
SCALE_EPS = 1e-8


@dataclass(frozen=True)
class QRange:
    """An inclusive integer grid [qmin, qmax]."""

    qmin: int
    qmax: int

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def check_bits(bits: object, allowed: tuple[int, ...], field: str) -> int:
    """Raise ValueError naming `field` unless bits is one of `allowed` (bools rejected)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(str, allowed))}, got {bits!r}")
    return bits


def weight_range(bits: int) -> QRange:
    """Symmetric narrow signed grid for weights."""
    check_bits(bits, WEIGHT_BITS, "weight_bits")
    qmax = 2 ** (bits - 1) - 1
    return QRange(-qmax, qmax)


def act_range(bits: int) -> QRange:
    """Unsigned grid for activations."""
    check_bits(bits, ACT_BITS, "act_bits")
    return QRange(0, 2**bits - 1)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, qrange: QRange) -> torch.Tensor:
    """Integer codes (held in x's float dtype): clamp(round(x / scale) + zero_point, qmin, qmax)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qrange.qmin, qrange.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int,
                  qrange: QRange) -> torch.Tensor:
    """x snapped onto the integer grid and mapped back: what an integer kernel would see, in float."""
    return dequantize(quantize(x, scale, zero_point, qrange), scale, zero_point)


# The second 8-bit pass of a residual quantizer: what rounding onto a grid of step s left, |r| <= s / 2, on a
# symmetric s8 grid of step s / 254 (an i8 kernel without a zero-point).
RESIDUAL_RANGE = QRange(-127, 127)


def residual_step(scale: torch.Tensor | float) -> torch.Tensor | float:
    """Step of the residual pass of an input quantized with step `scale`: half a step spread over 127 levels."""
    return scale / (2 * RESIDUAL_RANGE.qmax)


def symmetric_scale(threshold: torch.Tensor, qrange: QRange) -> torch.Tensor:
    """Scale that maps [-threshold, threshold] onto the symmetric grid."""
    return torch.clamp(threshold / qrange.qmax, min=SCALE_EPS)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, qrange: QRange) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero_point) mapping [lo, hi] onto the unsigned grid.

    The range is first widened to include 0 so that zero_point is an integer inside the grid and real 0 is exact.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (qrange.qmax - qrange.qmin), min=SCALE_EPS)
    zero_point = torch.clamp(qrange.qmin - torch.round(lo / scale), qrange.qmin, qrange.qmax)
    return scale, zero_point


def symmetric_act_qparams(threshold: torch.Tensor, qrange: QRange) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) with the zero point in the middle of the unsigned grid and [-threshold, threshold]
    inside it: at 8 bits zero point 128, so the grid is [-128, 127] * scale, an i8 grid without a zero-point."""
    zero_point = (qrange.qmin + qrange.qmax + 1) // 2
    scale = torch.clamp(threshold / (qrange.qmax - zero_point), min=SCALE_EPS)
    return scale, torch.full_like(scale, float(zero_point))


def channel_view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-output-channel vector (C,) to broadcast against a weight of `ndim` dims: (C, 1, ...)."""
    return values.reshape(-1, *([1] * (ndim - 1)))
