"""Lower a PTQ4DM-calibrated UNet to real int8 x86 kernels: torch.export -> PT2E -> inductor.

PT2E is told the qparams PTQ4DM already searched instead of calibrating observers of its own: a quantizer
(`quantizer.execution.pt2e_fixed.PTQ4DMQuantizer`) annotates each QuantLayer's activation and weight edge with
fixed-qparams specs (per-tensor u8 activation scale/zero-point, per-channel symmetric s8 weight scales, each on the
layer's own grid) and nothing else, so the edges PTQ4DM left in float stay float exactly as in simulation.

`convert_pt2e` then folds weights to int8 and inductor (with freezing) pattern-matches the
dequantize -> conv/linear -> quantize chains into oneDNN int8 convolutions and matmuls (VNNI / AMX); those
patterns come from torchao's x86 inductor passes, registered when its x86_inductor_quantizer module is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import fx, nn

from quantizer.diffusion.kinds import kind_of
from quantizer.ptq.quant_modules import QuantAttnProcessor, QuantLayer, SplitActQuantizer

logger = logging.getLogger(__name__)


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
    # The x86 module registers the inductor passes that turn q/dq chains into oneDNN int8 kernels.
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from quantizer.execution.pt2e_fixed import PTQ4DMQuantizer

    quantizer = PTQ4DMQuantizer(check_int8_grid(quant_unet))
    exported = torch.export.export(UNetForward(float_unet).eval(), example_inputs(float_unet, batch_size))
    prepared = prepare_pt2e(exported.module(), quantizer)
    logger.info("int8-x86 graph: %d layers on int8 kernels with PTQ4DM's qparams", quantizer.counts["layers"])
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
