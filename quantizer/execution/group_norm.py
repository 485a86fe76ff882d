"""GroupNorm written as per-channel reductions and one multiply-add, for OpenVINO's int8 graphs.

torch's GroupNorm reaches OpenVINO as reshape(N, G, -1) -> MVN -> reshape -> scale/shift. The reshape of the
full activation needs a planar layout, so the CPU plugin reorders every int8 convolution's channels-last output
back to planar before each GroupNorm (the f32 `Reorder`s of bench/openvino_profile.py, a fifth of the int8 graph's
time). Here the full activation is only reduced (its spatial mean and mean square per channel, two independent
reductions, the second a ReduceL2 that never writes x * x) and then normalised as x * scale + shift with
per-channel scale and shift worked out on the small N x C statistics: reductions and a multiply-add run in any
layout, so there is no reorder, and the multiply-add fuses with the SiLU and FakeQuantize after it. The two
statistics are stacked so that one small ReduceMean takes both group means: at batch 1 each small node's fixed cost
shows, and this halves the reorders between them. Measured (runs of bench/nncf_compare.py, docs/BENCHMARKS.md):
0.76x the int8 forward time at batch 16 and 0.86x at batch 1 on the built-in UNet, the ReduceL2 another 0.94x at
batch 16, the stacked group means 0.94x at batch 1 with bf16 float ops.

The variance is E[x^2] - E[x]^2 (one pass): in fp32 its rounding grows with (mean / std)^2 of a group, which is at
most 1.8 on the built-in UNet's GroupNorm inputs (fp32 difference from nn.GroupNorm 3e-7), far below the int8
error of the graph it runs in. fp32 graphs keep nn.GroupNorm: their convolutions keep a blocked layout that MVN
reads directly, and they are where the float groups must compute what fp32 computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ChannelGroupNorm(nn.Module):
    """nn.GroupNorm's output (N, C, *spatial) from per-channel means, with the same weight, bias and eps."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.weight = norm.weight  # the module's own parameters (None when affine=False)
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims, tail = tuple(range(2, x.dim())), (1,) * (x.dim() - 2)
        per_group = (self.groups, self.channels // self.groups)
        # Both per-channel statistics stacked, so one small ReduceMean takes their group means: fewer small nodes,
        # which is what a batch-1 forward pays for (bench/nncf_compare.py).
        stats = torch.stack([x.mean(dim=dims), self.mean_square(x, dims)], 1)  # N x 2 x C
        mean, mean_sq = stats.reshape(-1, 2, *per_group).mean(-1, keepdim=True).unbind(1)  # N x G x 1 each
        rstd = torch.rsqrt((mean_sq - mean * mean).clamp_min(0) + self.eps)
        scale = rstd.expand(-1, *per_group) if self.weight is None else rstd * self.weight.reshape(per_group)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.reshape(per_group)
        return x * scale.reshape(-1, self.channels, *tail) + shift.reshape(-1, self.channels, *tail)

    @staticmethod
    def mean_square(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Per-channel spatial mean of x^2 as a squared L2 norm: OpenVINO's ReduceL2 reads x once, where
        (x * x).mean() first writes x * x as a full tensor and reads it back (bench/nncf_compare.py times both)."""
        return torch.linalg.vector_norm(x, dim=dims).square() / math.prod(x.shape[2:])


def channelwise_group_norms(unet: nn.Module, norm_class: type[ChannelGroupNorm] = ChannelGroupNorm) -> int:
    """Replace every nn.GroupNorm of `unet` (in place) by `norm_class`; returns how many."""
    names = [name for name, m in unet.named_modules() if isinstance(m, nn.GroupNorm)]
    for name in names:
        unet.set_submodule(name, norm_class(unet.get_submodule(name)))
    return len(names)
