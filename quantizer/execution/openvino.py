"""Run a UNet on OpenVINO's CPU plugin; a quantized one on int8 kernels driven by PTQ4DM's own scales.

The fake-quant model is rewritten into a traceable copy in which every `QuantLayer` becomes

    x -> fake_quantize_per_tensor_affine(x, s_x, z_x, 0, 2^b-1) -> conv/linear(x, W_q)

where W_q = fake_quantize_per_channel_affine(W snapped to PTQ4DM's grid, s_w, 0, -127, 127). OpenVINO's PyTorch
frontend turns both into FakeQuantize nodes, and its low-precision transformations fold them into u8 x i8
convolutions/matmuls with exactly those scales and zero-points. Nothing else is quantized (no NNCF, no range
estimation of our own): the edges PTQ4DM left in float stay float. Grids narrower than 8 bits are expressed on
the 8-bit grid with the same scale (4-bit weights are snapped first; 6-bit activations pass a 6-bit FakeQuantize
and then the 8-bit one, which is exact), since the CPU kernels only know 8-bit levels.

The model is converted once with a dynamic batch dimension, so any batch size runs without padding. Each batch
size it meets also gets a static-shape compilation of the same model (about 0.4 s on the built-in UNet): with static
shapes the CPU plugin fuses the element-wise chains (FakeQuantize included) into JIT subgraphs and drops the
run-time shape arithmetic, 1.4-1.7x faster per forward than the dynamic graph (bench/openvino_static.py). At most
`static_graphs` of them are kept (least recently used goes); the dynamic graph serves when that is 0. OpenVINO's
model cache (CACHE_DIR) makes a restart cheaper still. A class-conditional UNet's graph takes the class labels as a
third input (int64, one per image, batch-sized like the others).
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from quantizer.diffusion.kinds import kind_of
from quantizer.execution.fake_quantized import ACT_QMAX, WEIGHT_QMAX, FakeQuantizedLayer
from quantizer.execution.group_norm import channelwise_group_norms
from quantizer.execution.int8_x86 import _cpu_flags as cpu_flags
from quantizer.ptq.quant_modules import QuantAttnProcessor, QuantLayer

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("bf16", "f32")
# Runtime layer types whose int8 execution the backend exists for.
WEIGHTED_LAYER_TYPES: tuple[str, ...] = ("Convolution", "FullyConnected", "MatMul")
# Static-shape graphs kept per executor (one per batch size met, least recently used evicted): each holds its own copy
# of the weights and activation buffers, so the bound is what keeps a worker's memory flat.
DEFAULT_STATIC_GRAPHS = 8


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


def traceable_quantized(quant_unet: nn.Module, exact_int8: bool | None = None,
                        channel_group_norm: bool = True) -> nn.Module:
    """A copy of the fake-quant UNet with every QuantLayer as FakeQuantizedLayer (the model to convert).

    exact_int8: whether int8 kernels are exact for any 8-bit weight (default: detect VNNI/AMX). If not, layers with
    weights above 7 bits are left to float (int8=False) rather than computed wrongly; a log line says how many.
    channel_group_norm: GroupNorms as per-channel reductions (quantizer.execution.group_norm: same arithmetic, no
    layout reorders around the int8 convolutions); False keeps nn.GroupNorm (for measuring the difference).
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
            unet.set_submodule(name, FakeQuantizedLayer(module, int8))
    if channel_group_norm:
        channelwise_group_norms(unet)
    if in_float:  # info, not a warning: the results stay exact; the remedy is another precision or other hardware
        logger.info("openvino: this CPU has no VNNI/AMX, so u8 x s8 kernels saturate with 8-bit weights; "
                    "%d of %d quantized layers run as float simulation instead (e.g. %s); weights of at most 7 "
                    "bits (precision w7a8) run the int8 kernels", len(in_float), len(layers), in_float[0])
    return unet


class _Forward(nn.Module):
    """(x_t, t per image) -> eps, the tensor function to trace; t has shape (batch,) so it can vary per image."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, return_dict=False)[0]


class _ClassForward(_Forward):
    """(x_t, t per image, class label per image) -> eps, for a class-conditional UNet."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


class _TextForward(_Forward):
    """(x_t, t per image, text embeddings per image) -> eps, for a text-to-image UNet (UNet2DConditionModel)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def _input_shapes(model: Any, config: Any, batch: int) -> dict[Any, Any]:
    """Each graph input's shape for `batch` images (-1: dynamic): x_t, t, then class labels or text embeddings,
    whose sequence length stays dynamic (the tokenizer's, which the UNet config does not know)."""
    import openvino as ov

    channels, size = int(config.in_channels), config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    shapes = {model.inputs[0]: ov.PartialShape([batch, channels, int(h), int(w)])}
    for graph_input in model.inputs[1:]:
        rank = graph_input.get_partial_shape().rank.get_length()
        shapes[graph_input] = ov.PartialShape([batch] if rank == 1 else [batch, -1, int(config.cross_attention_dim)])
    return shapes


def convert(unet: nn.Module) -> Any:
    """An openvino.Model of `unet` (fp32 or traceable fake-quant) with a dynamic batch dimension.

    Traced here (without torch's trace check, which reruns the model) and converted from the ScriptModule:
    3-4x faster than letting convert_model trace and reshape through its `input=` preprocessing.
    """
    import openvino as ov

    channels, size = int(unet.config.in_channels), unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    example: tuple[torch.Tensor, ...] = (torch.randn(2, channels, h, w), torch.tensor([500, 500]))
    forward = _Forward(unet)
    kind = kind_of(unet.config)
    if kind.class_conditional:
        example, forward = (*example, torch.tensor([0, 1])), _ClassForward(unet)
    elif kind.takes_prompt:
        example, forward = (*example, torch.randn(2, 8, int(unet.config.cross_attention_dim))), _TextForward(unet)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape asserts frozen for this (C, H, W): fine
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: still what OpenVINO's frontend reads
        traced = torch.jit.trace(forward.eval(), example, check_trace=False)
        model = ov.convert_model(traced, example_input=example, share_weights=False)
    model.reshape(_input_shapes(model, unet.config, -1))
    return model


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS reports one, as in a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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

    Any batch size runs: on a static-shape graph of that size (compiled on first use, the fast path) or, when
    `static_graphs` is 0, on the one dynamic-batch graph. Batches above `max_batch` are split (bounds activation
    memory); nothing is padded. Each call takes its own infer request from a pool per graph, so threads may call
    concurrently.
    """

    def __init__(self, unet: nn.Module, backend: str, precision: str, max_batch: int,
                 cache_dir: str | Path | None = None, static_graphs: int = DEFAULT_STATIC_GRAPHS) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if static_graphs < 0:
            raise ValueError(f"static_graphs must be >= 0, got {static_graphs}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.backend = backend
        self.precision = precision
        self.config = unet.config
        self.max_batch = max_batch
        self.static_graphs = static_graphs
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.class_conditional = kind_of(unet.config).class_conditional  # the graph's third input: class labels
        self.text_conditional = kind_of(unet.config).takes_prompt  # ... or text embeddings
        start = time.perf_counter()
        # The torch module is not kept; the openvino.Model is, since each new batch size is compiled from it.
        self._model = convert(unet)
        self.convert_seconds = round(time.perf_counter() - start, 2)
        self.compile_seconds: float | None = None  # the dynamic graph's
        self.static_compile_seconds: dict[int, float] = {}
        self._compiled: Any = None
        self._static: OrderedDict[int, Any] = OrderedDict()
        self._requests: dict[int | None, queue.SimpleQueue[Any]] = {}
        self._compile_lock = threading.RLock()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # inputs and outputs; bf16 (if chosen) is internal to the plugin

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def compiled(self) -> Any:
        """The dynamic-batch openvino.CompiledModel (compiled on first use)."""
        if self._compiled is None:
            with self._compile_lock:
                if self._compiled is None:
                    self._compiled, self.compile_seconds = self._compile(self._model)
                    logger.info("%s (%s) compiled in %.2f s (converted in %.2f s)", self.backend, self.precision,
                                self.compile_seconds, self.convert_seconds)
        return self._compiled

    @property
    def static_batch_sizes(self) -> list[int]:
        """Batch sizes that have a static graph now, least recently used first."""
        return list(self._static)

    def _compile(self, model: Any) -> tuple[Any, float]:
        import openvino as ov

        # The process's thread budget is torch's (the worker's torch_threads, the CLI's default): without it the
        # runtime takes every core, and two workers on one machine would each run on both cores. A process with
        # fewer threads than cores shares the machine, so its threads are not pinned: the runtime pins to the
        # first cores, and two 1-thread workers would both run on core 0 (bench/load.py: 1.06 cores busy).
        threads = torch.get_num_threads()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_NUM_THREADS": threads}
        if threads < usable_cores():
            config["ENABLE_CPU_PINNING"] = False
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(self.cache_dir)
        start = time.perf_counter()
        compiled = ov.Core().compile_model(model, "CPU", config)
        return compiled, round(time.perf_counter() - start, 2)

    def _graph(self, batch: int) -> tuple[int | None, Any]:
        """(key, compiled model) that runs `batch` images: its static graph (compiled now if new), else dynamic."""
        if self.static_graphs == 0:
            return None, self.compiled
        with self._compile_lock:
            if batch in self._static:
                self._static.move_to_end(batch)
                return batch, self._static[batch]
            model = self._model.clone()
            model.reshape(_input_shapes(model, self.config, batch))
            compiled, seconds = self._compile(model)
            self._static[batch] = compiled
            self.static_compile_seconds[batch] = seconds
            while len(self._static) > self.static_graphs:
                evicted, _ = self._static.popitem(last=False)
                self._requests.pop(evicted, None)
            logger.info("%s (%s) compiled for batch %d in %.2f s", self.backend, self.precision, batch, seconds)
            return batch, compiled

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> dict[int, float]:
        """Compile now (not on the first request) for each batch size and run the largest once; returns compile
        seconds per batch size (its static graph's, or the one dynamic graph's when static_graphs is 0)."""
        sizes = sorted({min(int(b), self.max_batch) for b in batch_sizes})
        channels, size = int(self.config.in_channels), self.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        seconds: dict[int, float] = {}
        for b in sizes:
            key, _ = self._graph(b)
            seconds[b] = float(self.compile_seconds or 0.0) if key is None else self.static_compile_seconds[b]
        for b in sizes[-1:]:  # the largest batch sizes the runtime's buffers once
            labels = torch.zeros(b, dtype=torch.int64) if self.class_conditional else None
            text = torch.zeros(b, 1, int(self.config.cross_attention_dim)) if self.text_conditional else None
            self(torch.zeros(b, channels, h, w), torch.tensor(0), class_labels=labels, encoder_hidden_states=text)
        return seconds

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, encoder_hidden_states: torch.Tensor | None = None,
                **kwargs: object) -> UNet2DOutput | tuple[torch.Tensor]:
        if kwargs:
            raise TypeError(f"unsupported arguments for an executed UNet: {', '.join(kwargs)}")
        x = sample.detach().to("cpu", torch.float32)
        inputs = [x.split(self.max_batch), _per_image(timestep, x.shape[0], "timestep").split(self.max_batch)]
        if self.class_conditional:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            inputs.append(_per_image(class_labels, x.shape[0], "class_labels").split(self.max_batch))
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (its graph has no class input)")
        if self.text_conditional != (encoder_hidden_states is not None):
            raise ValueError("encoder_hidden_states: a text-to-image UNet's graph needs them, any other takes none")
        if encoder_hidden_states is not None:
            states = encoder_hidden_states.detach().to("cpu", torch.float32)
            if states.shape[0] != x.shape[0]:
                raise ValueError(f"encoder_hidden_states must hold one row per image ({x.shape[0]})")
            inputs.append(states.split(self.max_batch))
        outputs = [self._infer(*chunk) for chunk in zip(*inputs, strict=True)]
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def _infer(self, *tensors: torch.Tensor) -> torch.Tensor:
        with self._request(tensors[0].shape[0]) as request:
            result = request.infer([np.ascontiguousarray(tensor.numpy()) for tensor in tensors])
            return torch.from_numpy(np.array(result[0], copy=True))

    @contextmanager
    def _request(self, batch: int) -> Any:
        key, compiled = self._graph(batch)
        pool = self._requests.setdefault(key, queue.SimpleQueue())
        try:
            request = pool.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()  # keeps its compiled model alive, even once evicted
        try:
            yield request
        finally:
            pool.put(request)

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


def _per_image(value: torch.Tensor | int, batch: int, name: str) -> torch.Tensor:
    """One int64 value per image (a single value is repeated), the graph's integer inputs."""
    flat = torch.as_tensor(value).detach().to("cpu", torch.int64).reshape(-1)
    if flat.numel() == 1:
        return flat.expand(batch)
    if flat.numel() != batch:
        raise ValueError(f"{name} must be one value or one per image ({batch}), got {flat.numel()}")
    return flat


def build_openvino(unet: nn.Module, backend: str, max_batch: int, cache_dir: str | Path | None = None,
                   precision: str | None = None, static_graphs: int = DEFAULT_STATIC_GRAPHS) -> OpenVINOUNet:
    """An OpenVINOUNet of `unet`: a fake-quant model runs on int8 kernels with its own scales, fp32 as is.

    precision: what the float ops compute in; default bf16 where the CPU has it natively, else f32.
    """
    if precision is None:
        precision = "bf16" if cpu_bf16() else "f32"
    quantized = any(isinstance(m, QuantLayer) for m in unet.modules())
    source = traceable_quantized(unet) if quantized else copy.deepcopy(unet).eval()
    executor = OpenVINOUNet(source, backend, precision, max_batch, cache_dir, static_graphs)
    del source  # only the openvino.Model (then the compiled model) is kept
    return executor
