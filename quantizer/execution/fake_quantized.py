"""A PTQ4DM QuantLayer written as torch's fake-quantize ops: the form OpenVINO's frontend turns into FakeQuantize
nodes and its low-precision transformations fold into u8 x s8 kernels with exactly PTQ4DM's scales."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantizer.ptq.fake_quant import RESIDUAL_RANGE, residual_step
from quantizer.ptq.quant_modules import QuantConv2d, QuantLayer, QuantLinear, SplitActQuantizer

# The 8-bit grids of the CPU's int8 kernels: u8 activations, narrow symmetric s8 weights (as PTQ4DM's 8-bit grid).
ACT_QMAX = 255
WEIGHT_QMAX = 127


class FakeQuantizedLayer(nn.Module):
    """A QuantLayer as torch's fake-quantize ops, which OpenVINO converts to FakeQuantize nodes.

    int8=False keeps the weights as plain float constants on PTQ4DM's grid (no weight FakeQuantize): OpenVINO then
    cannot fold the layer into an integer kernel and runs the same simulation in float (exact, not faster).
    A conv whose input is split (SplitActQuantizer: one range per half of a skip concat) becomes two convolutions,
    each on its half of the input channels and of the weight, summed (the bias once): a u8 kernel takes one
    activation scale, and the split weights keep their per-output-channel scales.
    A residual input (ActQuantizer.residual) adds a second convolution with the same int8 weight on the first
    pass's rounding residual, quantized symmetrically (an s8 input without a zero-point), summed.
    """

    def __init__(self, quant_layer: QuantLayer, int8: bool = True) -> None:
        super().__init__()
        layer, iq, wq = quant_layer.layer, quant_layer.input_quantizer, quant_layer.weight_quantizer
        self.is_conv = isinstance(quant_layer, QuantConv2d)
        if not self.is_conv and not isinstance(quant_layer, QuantLinear):
            raise TypeError(f"unsupported quantized layer {type(quant_layer).__name__}")
        self.int8 = int8
        self.layer = layer  # keeps stride/padding/bias; its weight is replaced by the snapped one below
        halves = (iq.first, iq.second) if isinstance(iq, SplitActQuantizer) else (iq,)
        self.act_qparams = [(float(q.scale), int(q.zero_point)) for q in halves]
        self.residual = [bool(q.residual) for q in halves]
        self.act_qmax = int(iq.qrange.qmax)
        with torch.no_grad():  # on PTQ4DM's grid (any width <= 8 bits): the 8-bit FakeQuantize below is exact
            snapped = wq(layer.weight.detach().float())
        self.split = int(iq.split) if len(halves) == 2 else None
        if self.split is not None:
            self.register_buffer("weight_second", snapped[:, self.split:].contiguous())
            snapped = snapped[:, :self.split].contiguous()
        self.register_buffer("weight", snapped)
        self.register_buffer("weight_scale", wq.scale.detach().flatten().float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(wq.scale.numel(), dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return self._run(x, 0, self.weight, self.layer.bias)
        first = self._run(x[:, :self.split], 0, self.weight, self.layer.bias)
        return first + self._run(x[:, self.split:], 1, self.weight_second, None)

    def _run(self, x: torch.Tensor, half: int, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale, zero_point = self.act_qparams[half]
        q = x
        if self.act_qmax != ACT_QMAX:  # a narrower grid first, then the same values on the u8 kernel grid
            q = torch.fake_quantize_per_tensor_affine(q, scale, zero_point, 0, self.act_qmax)
        q = torch.fake_quantize_per_tensor_affine(q, scale, zero_point, 0, ACT_QMAX)
        if self.int8:
            weight = torch.fake_quantize_per_channel_affine(weight, self.weight_scale, self.weight_zero_point, 0,
                                                            -WEIGHT_QMAX, WEIGHT_QMAX)
        out = self._layer(q, weight, bias)
        if self.residual[half]:
            r = torch.fake_quantize_per_tensor_affine(x - q, residual_step(scale), 0, RESIDUAL_RANGE.qmin,
                                                      RESIDUAL_RANGE.qmax)
            out = out + self._layer(r, weight, None)
        return out

    def _layer(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.is_conv:
            return self.layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)
