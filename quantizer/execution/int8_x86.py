"""Lower a PTQ4DM-calibrated UNet to real int8 x86 kernels: torch.export -> PT2E (X86InductorQuantizer) -> inductor.

PT2E inserts an observer on every edge an int8 kernel will read. Instead of calibrating those observers, each is
handed the scale/zero-point PTQ4DM already searched for the same tensor:

* weight observers (fed by a parameter) get the layer's per-channel symmetric weight scales and narrow grid;
* activation observers feeding a Conv2d/Linear get that layer's per-tensor input scale/zero-point (an observer
  read by several layers, as q, k and v read one tensor, is split into one per layer, see _duplicate_observer);
* observers the fake-quant model has no counterpart for (the residual ``add`` inputs the x86 quantizer would
  also quantize, layers left in full precision) are removed, so those edges stay float exactly as in simulation.

`convert_pt2e` then folds weights to int8 and inductor (with freezing) pattern-matches the
dequantize -> conv/linear -> quantize chains into oneDNN int8 convolutions and matmuls (VNNI / AMX).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import fx, nn

from quantizer.diffusion.kinds import kind_of
from quantizer.ptq.quant_modules import QuantAttnProcessor, QuantLayer, SplitActQuantizer

logger = logging.getLogger(__name__)

_WEIGHTED_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


class UNetForward(nn.Module):
    """A UNet2DModel as a pure tensor function (x_t, t[, class labels]) -> eps, the form torch.export needs."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None:
            return self.unet(sample, timestep, return_dict=False)[0]
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


def example_inputs(unet: nn.Module, batch: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, timestep: int = 500) -> tuple[torch.Tensor, ...]:
    """What a graph of `unet` for `batch` images is exported with: x_t, one t, and a class-conditional UNet's
    class label per image."""
    channels, size = int(unet.config.in_channels), unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    example = (torch.randn(batch, channels, h, w, device=device, dtype=dtype), torch.tensor(timestep, device=device))
    if kind_of(unet.config).class_conditional:
        example += (torch.zeros(batch, dtype=torch.int64, device=device),)
    return example


def int8_supported() -> str | None:
    """None when this machine can run the int8-x86 backend, else why not."""
    try:
        import torchao.quantization.pt2e  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn) support"
    cpu = _cpu_flags()
    if cpu and not {"avx512_vnni", "avx_vnni", "amx_int8"} & cpu:
        return "the CPU has no VNNI/AMX int8 instructions; int8 would be slower than fp32"
    return None


def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (otherwise bf16 is emulated and slower than fp32)."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _module_name(node: fx.Node) -> str:
    """Dotted name (relative to the UNet) of the nn.Module a graph op came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("unet.")


def _fixed(scale: torch.Tensor, zero_point: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    return lambda: (scale, zero_point)


def _assign_qparams(prepared: fx.GraphModule, quant_layers: dict[str, QuantLayer]) -> dict[str, int]:
    """Give every observer PTQ4DM's qparams, or remove it; returns counts for the log."""
    counts = {"weights": 0, "activations": 0, "removed": 0, "duplicated": 0}
    graph = prepared.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or "activation_post_process" not in str(node.target):
            continue
        source = node.args[0]
        first = True
        for user in list(node.users):
            layer = quant_layers.get(_module_name(user)) if user.target in _WEIGHTED_OPS else None
            if layer is None:
                user.replace_input_with(node, source)  # this consumer stays float, as in the simulation
                continue
            target = node if first else _duplicate_observer(prepared, node, user)
            counts["duplicated"] += not first
            first = False
            observer = getattr(prepared, str(target.target))
            if source.op == "get_attr":
                wq = layer.weight_quantizer
                scale, zero_point = wq.scale.flatten().float(), torch.zeros(wq.scale.numel(), dtype=torch.int64)
                qrange, kind = wq.qrange, "weights"
            else:
                iq = layer.input_quantizer
                scale, zero_point = iq.scale.reshape(1).float(), iq.zero_point.reshape(1).long()
                qrange, kind = iq.qrange, "activations"
            observer.quant_min, observer.quant_max = qrange.qmin, qrange.qmax
            observer.calculate_qparams = _fixed(scale.cpu(), zero_point.cpu())
            counts[kind] += 1
            if kind == "activations" and user.target == torch.ops.aten.linear.default:
                _make_contiguous(graph, target)
        if not node.users:
            graph.erase_node(node)
            counts["removed"] += 1
    graph.lint()
    prepared.recompile()
    return counts


def _make_contiguous(graph: fx.Graph, observer: fx.Node) -> None:
    """Feed the observer (later the quantize op) a contiguous copy of its input.

    Attention's q/k/v read a transposed view of the GroupNorm output; inductor then quantizes into the same
    transposed layout and oneDNN's int8 linear only takes a contiguous 3-D input, so without this the three
    fall back to fp32 bmm. The copy fuses into the quantize kernel.
    """
    source = observer.args[0]
    if source.op == "get_attr":
        return
    with graph.inserting_before(observer):
        copy_node = graph.call_function(torch.ops.aten.clone.default, (source,),
                                        {"memory_format": torch.contiguous_format})
    copy_node.meta = dict(source.meta)
    observer.replace_input_with(source, copy_node)


def _duplicate_observer(prepared: fx.GraphModule, node: fx.Node, user: fx.Node) -> fx.Node:
    """A private observer for `user` on the same tensor.

    q, k and v read one tensor through one observer; after convert they would share one dequantize node, and
    inductor's int8 linear fusion only matches a dequantize with a single consumer (shared, the three ran as
    fp32 bmm: 17% of a CIFAR-sized UNet's time). Separate observers also keep each layer's own searched range.
    """
    name = f"{node.target}_{user.name}"
    prepared.add_submodule(name, copy.deepcopy(getattr(prepared, str(node.target))))
    with prepared.graph.inserting_after(node):
        clone = prepared.graph.call_module(name, node.args, node.kwargs)
    clone.meta = dict(node.meta)
    user.replace_input_with(node, clone)
    return clone


def drop_dtype_asserts(graph: torch.fx.GraphModule) -> None:
    """Remove export's fp32 dtype assertions, so autocast may run the float ops of the graph in bf16."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()


def under_bf16_autocast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Compile and run under CPU bf16 autocast (the compiled code guards on it); hand back fp32."""
    def run(*args: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args).float()
    return run


def check_int8_grid(quant_unet: nn.Module) -> dict[str, QuantLayer]:
    """The fake-quant layers, after checking their grids fit 8-bit kernels (u8 activations, s8 weights)."""
    layers = {name: m for name, m in quant_unet.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError("the UNet has no quantized layers; run quantize_ (or quantize_model) first")
    for name, layer in layers.items():
        if layer.input_quantizer.qrange.qmax > 255:
            raise ValueError(f"int8-x86 runs activations of at most 8 bits; {name} has "
                             f"{int(layer.input_quantizer.bits)} (use backend='fake' for w*a16)")
    if any(isinstance(m, SplitActQuantizer) for m in quant_unet.modules()):  # PT2E gives a conv one input range
        raise ValueError("int8-x86 does not run split concat inputs (split_concat=True); use backend='openvino' "
                         "or 'fake'")
    if any(isinstance(m, QuantAttnProcessor) for m in quant_unet.modules()):
        raise ValueError("int8-x86 does not run quantized attention matmuls "
                             "(quantize_attention_matmuls=True); use backend='fake'")
    return layers


def lower_int8_x86(float_unet: nn.Module, quant_unet: nn.Module, batch_size: int) -> fx.GraphModule:
    """The int8 graph for one batch size, with quant_unet's calibrated qparams (weights from float_unet).

    The result still needs torch.compile (with inductor freezing) to run on int8 kernels; eagerly it is a
    reference quantize/dequantize graph.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    layers = check_int8_grid(quant_unet)
    exported = torch.export.export(UNetForward(float_unet).eval(), example_inputs(float_unet, batch_size))
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    counts = _assign_qparams(prepared, layers)
    logger.info("int8-x86 graph: %(weights)d weight and %(activations)d activation qparams from PTQ4DM "
                "(%(duplicated)d observers split per layer), %(removed)d observers removed (edges kept in float)",
                counts)
    converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return converted


def _drop_unused_tensors(graph_module: fx.GraphModule) -> None:
    """Delete parameters/buffers the graph never reads: convert_pt2e leaves every fp32 weight attached next to
    its folded int8 copy, which would keep the int8 model as large as the float one in memory."""
    used = {str(n.target) for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name, _ in [*graph_module.named_parameters(), *graph_module.named_buffers()]:
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, leaf)
    graph_module.delete_all_unused_submodules()
