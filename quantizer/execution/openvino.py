"""Run a UNet on OpenVINO's CPU plugin; a quantized one on int8 kernels driven by PTQ4DM's own scales.

The fake-quant model is rewritten into a traceable copy in which every `QuantLayer` becomes

    x -> fake_quantize_per_tensor_affine(x, s_x, z_x, 0, 2^b-1) -> conv/linear(x, W_q)

where W_q = fake_quantize_per_channel_affine(W snapped to PTQ4DM's grid, s_w, 0, -127, 127). OpenVINO's PyTorch
frontend turns both into FakeQuantize nodes, and its low-precision transformations fold them into u8 x i8
convolutions/matmuls with exactly those scales and zero-points. Nothing else is quantized (no NNCF, no range
estimation of our own): the edges PTQ4DM left in float stay float. Grids narrower than 8 bits are expressed on
the 8-bit grid with the same scale (4-bit weights are snapped first; 6-bit activations pass a 6-bit FakeQuantize
and then the 8-bit one, which is exact), since the CPU kernels only know 8-bit levels.

One compiled model serves every batch size (the batch dimension is dynamic), so nothing is padded and nothing
recompiles per batch; OpenVINO's model cache (CACHE_DIR) makes a restart cheaper still.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from quantizer.execution.int8_x86 import _cpu_flags as cpu_flags
from quantizer.ptq.quant_modules import QuantAttnProcessor, QuantConv2d, QuantLayer, QuantLinear, SplitActQuantizer

logger = logging.getLogger(__name__)

# The 8-bit grids of the CPU's int8 kernels: u8 activations, narrow symmetric s8 weights (as PTQ4DM's 8-bit grid).
ACT_QMAX = 255
WEIGHT_QMAX = 127
PRECISIONS: tuple[str, ...] = ("bf16", "f32")
# Runtime layer types whose int8 execution the backend exists for.
WEIGHTED_LAYER_TYPES: tuple[str, ...] = ("Convolution", "FullyConnected", "MatMul")


def openvino_unavailable() -> str | None:
    """None when the openvino package imports, else why not."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"the openvino package is not installed (pip install openvino): {exc}"
    return None


def cpu_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (it lists BF16 among its capabilities)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def int8_dot_products_exact() -> bool:
    """Whether u8 x s8 dot products accumulate exactly in int32 here (VNNI or AMX).

    Without them (plain AVX2/AVX512) oneDNN multiplies u8 x s8 pairs with vpmaddubsw, which sums two products
    into a *saturating int16*: 2 * 255 * 127 overflows it, so 8-bit weights silently give wrong results
    (measured: 4-19% relative error per layer). Weights of at most SAFE_WEIGHT_QMAX fit in every case.
    """
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


# 2 * 255 * 64 = 32640 fits int16: weights on grids up to 7 bits (qmax 63) are exact on any x86 int8 kernel.
SAFE_WEIGHT_QMAX = 64


def check_openvino_grid(quant_unet: nn.Module) -> dict[str, QuantLayer]:
    """The fake-quant layers, after checking every grid fits OpenVINO's 8-bit kernels."""
    layers = {name: m for name, m in quant_unet.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError("the UNet has no quantized layers; run quantize_ (or quantize_model) first")
    for name, layer in layers.items():
        if layer.input_quantizer.qrange.qmax > ACT_QMAX:
            raise ValueError(f"openvino runs activations of at most 8 bits; {name} has "
                             f"{int(layer.input_quantizer.bits)} (use backend='fake' for w*a16)")
        if layer.weight_quantizer.qrange.qmax > WEIGHT_QMAX:
            raise ValueError(f"openvino runs weights of at most 8 bits; {name} has {int(layer.weight_quantizer.bits)}")
    if any(isinstance(m, QuantAttnProcessor) for m in quant_unet.modules()):
        raise ValueError("openvino does not run quantized attention matmuls "
                         "(quantize_attention_matmuls=True); use backend='fake'")
    return layers


class FakeQuantizedLayer(nn.Module):
    """A QuantLayer as torch's fake-quantize ops, which OpenVINO converts to FakeQuantize nodes.

    int8=False keeps the weights as plain float constants on PTQ4DM's grid (no weight FakeQuantize): OpenVINO then
    cannot fold the layer into an integer kernel and runs the same simulation in float (exact, not faster).
    A conv whose input is split (SplitActQuantizer: one range per half of a skip concat) becomes two convolutions,
    each on its half of the input channels and of the weight, summed (the bias once): a u8 kernel takes one
    activation scale, and the split weights keep their per-output-channel scales.
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
            return self._run(x, self.act_qparams[0], self.weight, self.layer.bias)
        first = self._run(x[:, :self.split], self.act_qparams[0], self.weight, self.layer.bias)
        return first + self._run(x[:, self.split:], self.act_qparams[1], self.weight_second, None)

    def _run(self, x: torch.Tensor, qparams: tuple[float, int], weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
        scale, zero_point = qparams
        if self.act_qmax != ACT_QMAX:  # a narrower grid first, then the same values on the u8 kernel grid
            x = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, self.act_qmax)
        x = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, ACT_QMAX)
        if self.int8:
            weight = torch.fake_quantize_per_channel_affine(weight, self.weight_scale, self.weight_zero_point, 0,
                                                            -WEIGHT_QMAX, WEIGHT_QMAX)
        if self.is_conv:
            return self.layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)


def traceable_quantized(quant_unet: nn.Module, exact_int8: bool | None = None) -> nn.Module:
    """A copy of the fake-quant UNet with every QuantLayer as FakeQuantizedLayer (the model to convert).

    exact_int8: whether int8 kernels are exact for any 8-bit weight (default: detect VNNI/AMX). If not, layers with
    weights above 7 bits are left to float (int8=False) rather than computed wrongly; a log line says how many.
    """
    layers = check_openvino_grid(quant_unet)
    exact_int8 = int8_dot_products_exact() if exact_int8 is None else exact_int8
    unet = copy.deepcopy(quant_unet).eval()
    in_float = []
    for name, module in list(unet.named_modules()):
        if isinstance(module, QuantLayer):
            int8 = exact_int8 or module.weight_quantizer.qrange.qmax <= SAFE_WEIGHT_QMAX
            if not int8:
                in_float.append(name)
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, FakeQuantizedLayer(module, int8))
    if in_float:  # info, not a warning: the results stay exact and nobody can act on it but with other hardware
        logger.info("openvino: this CPU has no VNNI/AMX, so u8 x s8 kernels saturate with 8-bit weights; "
                       "%d of %d quantized layers run as float simulation instead (e.g. %s)",
                       len(in_float), len(layers), in_float[0])
    return unet


class _Forward(nn.Module):
    """(x_t, t per image) -> eps, the tensor function to trace; t has shape (batch,) so it can vary per image."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]


def convert(unet: nn.Module) -> Any:
    """An openvino.Model of `unet` (fp32 or traceable fake-quant) with a dynamic batch dimension.

    Traced here (without torch's trace check, which reruns the model) and converted from the ScriptModule:
    3-4x faster than letting convert_model trace and reshape through its `input=` preprocessing.
    """
    import openvino as ov

    channels, size = int(unet.config.in_channels), unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    example = (torch.randn(2, channels, h, w), torch.tensor([500, 500]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape asserts frozen for this (C, H, W): fine
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: still what OpenVINO's frontend reads
        traced = torch.jit.trace(_Forward(unet).eval(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example, share_weights=False)
    model.reshape({model.inputs[0]: ov.PartialShape([-1, channels, int(h), int(w)]),
                   model.inputs[1]: ov.PartialShape([-1])})
    return model


def runtime_layers(compiled: Any) -> list[tuple[str, str, str]]:
    """(name, layer type, runtime precision) of every node the CPU plugin actually executes."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else ""
        layers.append((op.get_friendly_name(), layer_type, precision))
    return layers


class OpenVINOUNet(nn.Module):
    """A UNet compiled by OpenVINO for the CPU; call it like a UNet2DModel: unet(x_t, t).sample.

    One compiled model for every batch size. Batches above `max_batch` are split (bounds activation memory);
    nothing is padded. Each call takes its own infer request from a pool, so threads may call concurrently.
    """

    def __init__(self, unet: nn.Module, backend: str, precision: str, max_batch: int,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.backend = backend
        self.precision = precision
        self.config = unet.config
        self.max_batch = max_batch
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        start = time.perf_counter()
        self._model = convert(unet)  # the torch module is not kept: the openvino.Model holds its own copy
        self.convert_seconds = round(time.perf_counter() - start, 2)
        self.compile_seconds: float | None = None
        self._compiled: Any = None
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._compile_lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # inputs and outputs; bf16 (if chosen) is internal to the plugin

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def compiled(self) -> Any:
        """The openvino.CompiledModel (compiled on first use)."""
        if self._compiled is None:
            with self._compile_lock:
                if self._compiled is None:
                    self._compile()
        return self._compiled

    def _compile(self) -> None:
        import openvino as ov

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(self.cache_dir)
        start = time.perf_counter()
        self._compiled = ov.Core().compile_model(self._model, "CPU", config)
        self.compile_seconds = round(time.perf_counter() - start, 2)
        self._model = None  # the compiled model holds the (repacked, int8) weights
        logger.info("%s (%s) compiled in %.2f s (converted in %.2f s)", self.backend, self.precision,
                    self.compile_seconds, self.convert_seconds)

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> dict[int, float]:
        """Compile now (not on the first request) and run each batch size once; returns compile seconds per
        batch size, the same one compilation for all of them."""
        sizes = sorted({min(int(b), self.max_batch) for b in batch_sizes})
        self.compiled  # noqa: B018 - compiles
        channels, size = int(self.config.in_channels), self.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        for b in sizes[-1:]:  # the largest batch sizes the runtime's buffers once
            self(torch.zeros(b, channels, h, w), torch.tensor(0))
        return dict.fromkeys(sizes, float(self.compile_seconds or 0.0))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True,
                **kwargs: object) -> UNet2DOutput | tuple[torch.Tensor]:
        if kwargs:
            raise TypeError(f"unsupported arguments for an executed UNet: {', '.join(kwargs)}")
        x = sample.detach().to("cpu", torch.float32)
        t = torch.as_tensor(timestep).detach().to("cpu", torch.int64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        elif t.numel() != x.shape[0]:
            raise ValueError(f"timestep must be one value or one per image ({x.shape[0]}), got {t.numel()}")
        outputs = [self._infer(xs, ts) for xs, ts in zip(x.split(self.max_batch), t.split(self.max_batch),
                                                         strict=True)]
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def _infer(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self._request() as request:
            result = request.infer([np.ascontiguousarray(x.numpy()), np.ascontiguousarray(t.numpy())])
            return torch.from_numpy(np.array(result[0], copy=True))

    @contextmanager
    def _request(self) -> Any:
        compiled = self.compiled
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            yield request
        finally:
            self._requests.put(request)

    def layer_precisions(self) -> dict[str, Counter[str]]:
        """Runtime precision counts per executed layer type, e.g. {'Convolution': {'u8': 12}, ...}."""
        table: dict[str, Counter[str]] = {}
        for _, layer_type, precision in runtime_layers(self.compiled):
            table.setdefault(layer_type, Counter())[precision] += 1
        return table

    def weight_bytes(self) -> int:
        """Bytes of the constants the compiled model computes with (int8 weights count one byte each)."""
        total = 0
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            if op.get_rt_info()["layerType"].astype(str) == "Const":
                out = op.output(0)
                total += out.get_element_type().size * int(np.prod(out.get_shape(), dtype=np.int64))
        return total

    def int8_layer_count(self) -> int:
        """How many convolutions/matmuls execute as u8/i8 kernels."""
        return sum(n for layer_type, counts in self.layer_precisions().items() if layer_type in WEIGHTED_LAYER_TYPES
                   for precision, n in counts.items() if precision in ("u8", "i8"))


def build_openvino(unet: nn.Module, backend: str, max_batch: int, cache_dir: str | Path | None = None,
                   precision: str | None = None) -> OpenVINOUNet:
    """An OpenVINOUNet of `unet`: a fake-quant model runs on int8 kernels with its own scales, fp32 as is.

    precision: what the float ops compute in; default bf16 where the CPU has it natively, else f32.
    """
    if precision is None:
        precision = "bf16" if cpu_bf16() else "f32"
    quantized = any(isinstance(m, QuantLayer) for m in unet.modules())
    source = traceable_quantized(unet) if quantized else copy.deepcopy(unet).eval()
    executor = OpenVINOUNet(source, backend, precision, max_batch, cache_dir)
    del source  # only the openvino.Model (then the compiled model) is kept
    return executor
