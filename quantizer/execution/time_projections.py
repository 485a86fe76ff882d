"""The resnets' time-embedding projections as one int8 matmul, for OpenVINO's int8 graphs.

Every resnet block of a diffusers UNet projects the same SiLU(time embedding) with its own `time_emb_proj`
Linear. PTQ4DM's input ranges are searched on that input alone, so all these layers carry the same activation
scale and zero-point; their weights keep per-output-channel scales. So the projections are exactly one
FakeQuantize of the shared input and one matmul over the concatenated weights, each block taking its slice of
the output: the same arithmetic (the output is bit-identical), one int8 FullyConnected instead of one per block
(11 -> 1 on the built-in UNet). Only small batches notice, where the per-block matmuls are mostly dispatch: on the
built-in UNet 0.97x the int8 forward at batch 1 (3.92 against 4.05 ms, 500 shuffled interleaved repeats), even
from batch 2 up; bench/nncf_compare.py shows both graphs side by side.

Tracing records what the Python calls compute: each block's SiLU of the time embedding is memoised (the same
input tensor gives the same output tensor), and the fused projection is computed once per input tensor and
sliced by every block that passes that tensor. A block that passes another tensor (a UNet whose blocks see
different embeddings) gets the fused product of its own input: still exact, only wasted width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantizer.execution.fake_quantized import ACT_QMAX, WEIGHT_QMAX, FakeQuantizedLayer


class _SharedProjection:
    """The concatenated weights of the fused layers and the last (input, output) pair computed."""

    def __init__(self, layers: list[FakeQuantizedLayer]) -> None:
        self.act_qparams = layers[0].act_qparams[0]
        with torch.no_grad():  # constants of the traced graph (a model's trainable bias must not carry grad)
            self.weight = torch.cat([layer.weight for layer in layers])
            self.weight_scale = torch.cat([layer.weight_scale for layer in layers])
            self.weight_zero_point = torch.zeros_like(self.weight_scale, dtype=torch.int32)
            self.bias = torch.cat([layer.layer.bias if layer.layer.bias is not None else layer.weight.new_zeros(
                layer.weight.shape[0]) for layer in layers])
        self.source: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.source is not x:
            scale, zero_point = self.act_qparams
            x_q = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, ACT_QMAX)
            weight = torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale, self.weight_zero_point,
                                                            0, -WEIGHT_QMAX, WEIGHT_QMAX)
            self.source, self.output = x, F.linear(x_q, weight, self.bias)
        assert self.output is not None
        return self.output


class SlicedProjection(nn.Module):
    """One block's `time_emb_proj`: its output channels [start, stop) of the shared projection."""

    def __init__(self, shared: _SharedProjection, start: int, stop: int) -> None:
        super().__init__()
        self.shared, self.start, self.stop = shared, start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)[..., self.start:self.stop]


class _MemoSiLU(nn.Module):
    """SiLU that returns the same output tensor for the same (2-D, embedding) input tensor, shared by the blocks."""

    def __init__(self, memo: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.memo = memo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the blocks' hidden states: computed as always
            return F.silu(x)
        if self.memo.get("source") is not x:
            self.memo["source"], self.memo["output"] = x, F.silu(x)
        return self.memo["output"]


def fuse_time_projections(unet: nn.Module) -> int:
    """Replace the blocks' int8 `time_emb_proj` layers (in place) by slices of one shared projection.

    Applies only where it is exact: every such layer an int8 FakeQuantizedLayer Linear on the 8-bit grid with the
    same activation scale and zero-point, in a block whose `nonlinearity` is SiLU. Returns how many layers were
    fused (0: the UNet is left as it was).
    """
    blocks = [m for m in unet.modules() if isinstance(getattr(m, "time_emb_proj", None), FakeQuantizedLayer)]
    layers = [block.time_emb_proj for block in blocks]
    fusable = (len(layers) > 1
               and all(not layer.is_conv and layer.int8 and layer.split is None and layer.act_qmax == ACT_QMAX
                       for layer in layers)
               and len({tuple(layer.act_qparams) for layer in layers}) == 1
               and all(isinstance(getattr(block, "nonlinearity", None), nn.SiLU) for block in blocks))
    if not fusable:
        return 0
    shared, memo, start = _SharedProjection(layers), {}, 0
    for block, layer in zip(blocks, layers, strict=True):
        stop = start + layer.weight.shape[0]
        block.time_emb_proj = SlicedProjection(shared, start, stop)
        block.nonlinearity = _MemoSiLU(memo)
        start = stop
    return len(layers)
