"""A PT2E quantizer that says PTQ4DM's scales instead of observing any: one fixed-qparams spec per int8 edge.

For every `QuantLayer`'s conv2d/linear in the exported graph it annotates exactly two input edges, and nothing else
(so every other edge stays float, as in the simulation):

* the activation with PT2E's `FixedQParamsQuantizationSpec` (u8, per tensor): the layer's searched input
  scale/zero-point on its own grid (6-bit activations keep quant_max 63);
* the weight with a `QuantizationSpec` whose observer is built holding the layer's per-channel symmetric scales
  (`FixedPerChannelObserver`): PT2E's fixed-qparams spec is per tensor only, and weights need one scale per output
  channel.

Implicit sharing is off, so two layers reading one tensor (q, k and v read one GroupNorm output) get an observer,
hence a quantize/dequantize pair, each: inductor's int8 linear fusion only matches a dequantize with a single
consumer (shared, the three ran as fp32 bmm: 17% of a CIFAR-sized UNet's time), and each keeps its own range.
`convert_pt2e` turns the observers into quantize/dequantize ops with those qparams and folds the weights to int8.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import fx
from torchao.quantization.pt2e.observer import ObserverBase
from torchao.quantization.pt2e.quantizer import (
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

from quantizer.ptq.fake_quant import QRange
from quantizer.ptq.quant_modules import QuantLayer

logger = logging.getLogger(__name__)

WEIGHTED_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


class FixedPerChannelObserver(ObserverBase):
    """FixedQParamsObserver per channel: hands back the scales it was built with and observes nothing.

    The name must contain "PerChannel": prepare_pt2e passes a spec's ch_axis only to such observer classes.
    """

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, ch_axis: int = 0, dtype: torch.dtype = torch.int8,
                 qscheme: torch.qscheme = torch.per_channel_symmetric, quant_min: int = -127, quant_max: int = 127,
                 is_dynamic: bool = False) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        self.ch_axis, self.qscheme, self.quant_min, self.quant_max = ch_axis, qscheme, quant_min, quant_max
        self.register_buffer("scale", scale.detach().float().cpu().clone())
        self.register_buffer("zero_point", zero_point.detach().long().cpu().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point


def activation_spec(scale: torch.Tensor, zero_point: torch.Tensor, qrange: QRange) -> FixedQParamsQuantizationSpec:
    return FixedQParamsQuantizationSpec(dtype=torch.uint8, scale=float(scale.reshape(-1)[0]),
                                        zero_point=int(zero_point.reshape(-1)[0]), quant_min=qrange.qmin,
                                        quant_max=qrange.qmax, qscheme=torch.per_tensor_affine)


def weight_spec(scale: torch.Tensor, qrange: QRange) -> QuantizationSpec:
    scale = scale.flatten()
    observer = FixedPerChannelObserver.with_args(scale=scale, zero_point=torch.zeros(scale.numel(), dtype=torch.int64))
    return QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=observer, quant_min=qrange.qmin,
                            quant_max=qrange.qmax, qscheme=torch.per_channel_symmetric, ch_axis=0)


def module_name(node: fx.Node) -> str:
    """Dotted name (relative to the UNet) of the nn.Module a graph op came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("unet.")


class PTQ4DMQuantizer(Quantizer):
    """Annotates each QuantLayer's conv/linear with that layer's PTQ4DM qparams; `counts` says how many."""

    def __init__(self, layers: dict[str, QuantLayer]) -> None:
        super().__init__()
        self.layers = layers
        self.counts: Counter[str] = Counter()

    def layer_of(self, node: fx.Node) -> QuantLayer | None:
        if node.op != "call_function" or node.target not in WEIGHTED_OPS:
            return None
        return self.layers.get(module_name(node))

    def transform_for_annotation(self, model: fx.GraphModule) -> fx.GraphModule:
        """Feed each quantized linear a contiguous copy of its input (the quantize op then reads the copy).

        Attention's q/k/v read a transposed view of the GroupNorm output; inductor then quantizes into the same
        transposed layout and oneDNN's int8 linear only takes a contiguous 3-D input, so without this the three
        fall back to fp32 bmm. The copy fuses into the quantize kernel.
        """
        graph = model.graph
        for node in list(graph.nodes):
            if node.target != torch.ops.aten.linear.default or self.layer_of(node) is None:
                continue
            source = node.args[0]
            with graph.inserting_before(node):
                contiguous = graph.call_function(torch.ops.aten.clone.default, (source,),
                                                 {"memory_format": torch.contiguous_format})
            contiguous.meta = dict(source.meta)
            node.replace_input_with(source, contiguous)
        graph.lint()
        model.recompile()
        return model

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        for node in model.graph.nodes:
            layer = self.layer_of(node)
            if layer is None:
                continue
            iq, wq = layer.input_quantizer, layer.weight_quantizer
            activation, weight = node.args[0], node.args[1]
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                input_qspec_map={activation: activation_spec(iq.scale, iq.zero_point, iq.qrange),
                                 weight: weight_spec(wq.scale, wq.qrange)},
                allow_implicit_sharing=False, _annotated=True)
            self.counts["layers"] += 1
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Warn about QuantLayers the graph never calls as conv2d/linear: they would run in float, unlike the
        simulation."""
        found = {module_name(n) for n in model.graph.nodes if self.layer_of(n) is not None}
        if missing := sorted(set(self.layers) - found):
            logger.warning("int8-x86: %d quantized layers not found in the exported graph run in float: %s",
                           len(missing), ", ".join(missing[:5]))
