"""Execution backends: how a (possibly quantized) UNet is actually run.

One verb, `build_executor(model, backend)`, returns an `ExecutableUNet`: a drop-in for the UNet in `sample()`
(same call, `.config`, `.dtype`, `.device`). Backends:

* ``eager``     the model as loaded (fp32), or the fake-quant simulation for a quantized model;
* ``compiled``  torch.compile (inductor) of the fp32 model;
* ``bf16``      the fp32 weights cast to bfloat16, compiled (the mixed-precision baseline int8 must beat);
* ``fake``      the PTQ4DM fake-quant model, eager (reference; any device, any bit width);
* ``int8-x86``  real int8 oneDNN kernels (VNNI/AMX) driven by PTQ4DM's scales, see `quantizer.execution.int8_x86`;
* ``int8-bf16-x86``  the same int8 convolutions/linears with every other op (GroupNorm, SiLU, adds, attention)
                in bfloat16 instead of fp32 (autocast over the int8 graph; needs AVX512-BF16 or AMX);
* ``openvino``  OpenVINO's CPU plugin, int8 kernels driven by PTQ4DM's scales (FakeQuantize nodes around exactly
                the tensors PTQ4DM quantized; fp32 elsewhere, so it computes what the simulation does), one
                dynamic-batch model, see `quantizer.execution.openvino`;
* ``openvino-int8-bf16``  the same with every other op in bf16 (needs native bf16): faster, further from the
                simulation (docs/SENSITIVITY.md);
* ``openvino-fp32`` / ``openvino-bf16``  an unquantized model on OpenVINO in fp32 / bf16 (baselines for it);
* ``auto``      for a quantized model on the CPU: openvino (one graph for every batch size, built in seconds
                instead of half a minute per batch size, and it runs the time-step groups of the served preset;
                at batch 16 int8-x86 is faster on the built-in model: docs/BENCHMARKS.md), else int8-x86 where the
                CPU has int8 kernels, else fake; on other devices fake; eager for fp32.

A class-conditional UNet takes `class_labels=` (one per image) on every backend, as diffusers' UNet2DModel does;
compiled graphs take them as an input beside x_t and t. A text-to-image UNet (UNet2DConditionModel) takes
`encoder_hidden_states=` on eager, fake and the openvino backends (an input of the OpenVINO graph); the torch graphs
do not run it.

Compiled graphs are static in the batch size (int8 dynamic-batch graphs fail inductor's layout checks in
torch 2.13), so batches are padded up to a power-of-two bucket (1, 2, 4, ...; at most 2x work, usually
none: the service and evaluation use power-of-two batches) and split above `max_batch`. Each bucket is
exported and compiled once, on first use or in `warmup`; inductor's on-disk FX graph cache makes a restart
of the same model cheaper.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from quantizer.diffusion.kinds import kind_of
from quantizer.execution.int8_x86 import (
    UNetForward,
    check_int8_grid,
    example_inputs,
    int8_supported,
    lower_int8_x86,
    native_bf16,
)
from quantizer.ptq.noise_correction import NoiseCorrectedUNet
from quantizer.ptq.quant_modules import QuantLayer
from quantizer.ptq.timestep_groups import TimestepGroupedUNet

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "eager", "compiled", "bf16", "fake", "int8-x86", "int8-bf16-x86", "openvino",
                             "openvino-int8-bf16", "openvino-fp32", "openvino-bf16")
INT8_BACKENDS: tuple[str, ...] = ("int8-x86", "int8-bf16-x86")
# backend -> (needs a quantized model, float precision inside OpenVINO; None = bf16 where native, else f32)
OPENVINO_BACKENDS: dict[str, tuple[bool, str]] = {"openvino": (True, "f32"), "openvino-int8-bf16": (True, "bf16"),
                                                  "openvino-fp32": (False, "f32"), "openvino-bf16": (False, "bf16")}
DEFAULT_MAX_BATCH = 64


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (hardware, missing package) or not for this model."""


def is_quantized(unet: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in unet.modules())


def resolve_backend(backend: str, quantized: bool, device: torch.device | str = "cpu") -> str:
    """The concrete backend `backend` means for this model and device; BackendUnavailable if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        if not quantized:
            return "eager"
        if not on_cpu:
            return "fake"
        from quantizer.execution.openvino import openvino_unavailable

        if openvino_unavailable() is None:
            return "openvino"
        return "int8-x86" if int8_supported() is None else "fake"
    if quantized and backend in ("eager", "compiled", "bf16", "openvino-fp32", "openvino-bf16"):
        raise BackendUnavailable(f"backend {backend!r} runs unquantized models; use 'fake', 'int8-x86' or 'openvino'")
    if not quantized and backend in ("fake", "openvino", "openvino-int8-bf16", *INT8_BACKENDS):
        raise BackendUnavailable(f"backend {backend!r} needs a quantized model (precision w<b>a<b>)")
    if backend in OPENVINO_BACKENDS:
        _check_openvino(backend, on_cpu)
    if backend in INT8_BACKENDS:
        if not on_cpu:
            raise BackendUnavailable(f"{backend} runs on the CPU; no int8 GPU backend is implemented (use 'fake')")
        reason = int8_supported()
        if reason is None and backend == "int8-bf16-x86" and not native_bf16():
            reason = "the CPU has no native bfloat16 (AVX512-BF16 / AMX)"
        if reason is not None:
            raise BackendUnavailable(f"{backend} is unavailable here: {reason}")
    return backend


def _check_openvino(backend: str, on_cpu: bool) -> None:
    from quantizer.execution.openvino import cpu_bf16, openvino_unavailable

    if not on_cpu:
        raise BackendUnavailable(f"{backend} runs on the CPU (OpenVINO's CPU plugin); use 'fake' on other devices")
    reason = openvino_unavailable()
    if reason is None and OPENVINO_BACKENDS[backend][1] == "bf16" and not cpu_bf16():
        reason = "OpenVINO's CPU plugin has no native bfloat16 on this CPU (OPTIMIZATION_CAPABILITIES lacks BF16)"
    if reason is not None:
        raise BackendUnavailable(f"{backend} is unavailable here: {reason}")


def float_weights_of(quant_unet: nn.Module) -> nn.Module:
    """An fp32 UNet with the quantized model's original weights (QuantLayer wrappers and attention hooks undone)."""
    unet = copy.deepcopy(quant_unet)
    for name, module in list(unet.named_modules()):
        if isinstance(module, QuantLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, module.layer)
    if hasattr(unet, "set_default_attn_processor"):
        unet.set_default_attn_processor()
    return unet.eval()


def drop_dtype_asserts(graph: torch.fx.GraphModule) -> None:
    """Remove export's fp32 dtype assertions, so autocast may run the float ops of the graph in bf16."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.graph.erase_node(node)
    graph.graph.lint()
    graph.recompile()


def _under_bf16_autocast(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Compile and run under CPU bf16 autocast (the compiled code guards on it); hand back fp32."""
    def run(*args: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(*args).float()
    return run


def bucket(batch: int, max_batch: int) -> int:
    """Smallest power of two >= batch, capped at max_batch."""
    return min(1 << (batch - 1).bit_length(), max_batch)


class ExecutableUNet(nn.Module):
    """A UNet behind a backend; call it like a UNet2DModel: unet(x_t, t).sample."""

    def __init__(self, unet: nn.Module, backend: str, max_batch: int = DEFAULT_MAX_BATCH,
                 reference: nn.Module | None = None) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.config = unet.config
        self.max_batch = max_batch
        self.compile_seconds: dict[int, float] = {}
        self._lock = threading.Lock()
        self._graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self.graph_modules: dict[int, nn.Module] = {}
        self._device = next(unet.parameters()).device
        self.class_conditional = kind_of(unet.config).class_conditional  # its graphs take class labels
        self._dtype = torch.bfloat16 if backend == "bf16" else torch.float32
        # `unet` is what the graphs are built from; `reference` (the fake-quant model) supplies int8 qparams.
        self.unet = unet.to(self._dtype) if backend == "bf16" else unet
        self.reference = reference

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def compiled(self) -> bool:
        return self.backend in ("compiled", "bf16", *INT8_BACKENDS)

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> dict[int, float]:
        """Build the graphs for these batch sizes now (not on the first request); returns seconds per bucket."""
        if self.compiled:
            for b in sorted({bucket(b, self.max_batch) for b in batch_sizes}):
                self._graph(b)
        return dict(self.compile_seconds)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True, **kwargs: object) -> UNet2DOutput | tuple[torch.Tensor]:
        if kwargs:
            raise TypeError(f"unsupported arguments for an executed UNet: {', '.join(kwargs)}")
        if not self.compiled:
            out = self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]
        else:
            out = self._run_compiled(sample, self._scalar_timestep(timestep), self._labels(class_labels, sample))
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def _labels(self, class_labels: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor | None:
        """One int64 class label per image for a class-conditional graph (which requires them), else None."""
        if not self.class_conditional:
            if class_labels is not None:
                raise ValueError("class_labels given to an unconditional UNet (its graph has no class input)")
            return None
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        labels = torch.as_tensor(class_labels, device=self._device).to(torch.int64).reshape(-1)
        return labels.expand(sample.shape[0]) if labels.numel() == 1 else labels

    def _scalar_timestep(self, timestep: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=self._device)
        if t.numel() != 1 and not bool((t == t.reshape(-1)[0]).all()):
            raise ValueError("compiled backends take one timestep per batch (every image at the same t)")
        return t.reshape(-1)[0].to(torch.int64)

    @torch.no_grad()
    def _run_compiled(self, sample: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        x = sample.to(self._device, self._dtype)
        outputs = []
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start: start + self.max_batch]
            inputs = [chunk, labels[start: start + self.max_batch]] if labels is not None else [chunk]
            n = chunk.shape[0]
            b = bucket(n, self.max_batch)
            if b > n:  # padded with zeros (class 0), cut off again below
                inputs = [torch.cat([part, part.new_zeros(b - n, *part.shape[1:])]) for part in inputs]
            x_in, *extra = (part.contiguous() for part in inputs)
            outputs.append(self._graph(b)(x_in, t, *extra)[:n])
        return torch.cat(outputs)

    def _graph(self, batch: int) -> Callable[..., torch.Tensor]:
        graph = self._graphs.get(batch)
        if graph is not None:
            return graph
        with self._lock:
            if batch not in self._graphs:
                start = time.perf_counter()
                self._graphs[batch] = self._compile(batch)
                self.compile_seconds[batch] = round(time.perf_counter() - start, 2)
                if set(self._graphs) >= {bucket(b, self.max_batch) for b in range(1, self.max_batch + 1)}:
                    # Every bucket is compiled: the float UNet and the fake-quant model are no longer needed.
                    self.unet = None
                    self.reference = None
                logger.info("%s graph for batch %d built in %.1f s", self.backend, batch,
                            self.compile_seconds[batch])
            return self._graphs[batch]

    def _compile(self, batch: int) -> Callable[..., torch.Tensor]:
        import torch._inductor.config as inductor_config

        # Freezing folds weights into constants so oneDNN can prepack them (int8 needs it to pick int8
        # kernels). Set globally: torch.compile(options={"freezing": True}) fails in 2.13 with prepack errors.
        inductor_config.freezing = True
        example = example_inputs(self.unet, batch, self._device, self._dtype, timestep=0)
        if self.backend in INT8_BACKENDS:
            module = lower_int8_x86(self.unet, self.reference, batch)
            if self.backend == "int8-bf16-x86":
                drop_dtype_asserts(module)
        else:
            module = torch.export.export(UNetForward(self.unet).eval(), example).module()
        self.graph_modules[batch] = module
        graph = torch.compile(module)
        if self.backend == "int8-bf16-x86":
            graph = _under_bf16_autocast(graph)
        with torch.no_grad():
            graph(*example)  # compile now, not on the first request
        return graph


def build_executor(unet: nn.Module, backend: str = "auto", max_batch: int = DEFAULT_MAX_BATCH,
                   cache_dir: str | Path | None = None) -> nn.Module:
    """`unet` ready to run on `backend`: the module itself for eager/fake, an ExecutableUNet (or, for openvino*,
    an OpenVINOUNet with the same interface) otherwise.

    unet: an fp32 UNet2DModel, or a fake-quant one from quantize_/quantize_model.
    cache_dir: where OpenVINO caches compiled models (CACHE_DIR) across restarts; None = no cache. Unused by the
    torch backends (inductor keeps its own cache).
    """
    if isinstance(unet, NoiseCorrectedUNet):  # the correction stays outside, on whatever runs the UNet
        return unet.map(lambda inner: build_executor(inner, backend, max_batch, cache_dir))
    if isinstance(unet, TimestepGroupedUNet):
        return _build_grouped(unet, backend, max_batch, cache_dir)
    quantized = is_quantized(unet)
    device = next(unet.parameters()).device
    requested, backend = backend, resolve_backend(backend, quantized, device)
    if kind_of(unet.config).takes_prompt and backend not in ("eager", "fake", *OPENVINO_BACKENDS):
        # The torch graphs take (x_t, t[, labels]); text embeddings reach only the OpenVINO graph.
        if requested != "auto":
            raise BackendUnavailable(f"backend {backend!r} does not run text-to-image UNets; use 'openvino' or "
                                     "'fake'")
        backend = "fake" if quantized else "eager"
    if backend in INT8_BACKENDS:
        try:
            check_int8_grid(unet)  # fail now, not at the first batch
        except ValueError as exc:
            if requested != "auto":
                raise
            logger.info("auto backend: running fake quant (%s)", exc)
            backend = "fake"
    if backend in ("eager", "fake"):
        return unet
    if backend in OPENVINO_BACKENDS:
        from quantizer.execution.openvino import build_openvino, check_openvino_grid

        if quantized:
            try:
                check_openvino_grid(unet)
            except ValueError as exc:
                if requested != "auto":
                    raise BackendUnavailable(str(exc)) from exc
                logger.info("auto backend: running fake quant (%s)", exc)
                return unet
        return build_openvino(unet, backend, max_batch, cache_dir, precision=OPENVINO_BACKENDS[backend][1])
    if backend in INT8_BACKENDS:
        return ExecutableUNet(float_weights_of(unet), backend, max_batch, reference=unet)
    return ExecutableUNet(copy.deepcopy(unet).eval(), backend, max_batch)


def _build_grouped(unet: TimestepGroupedUNet, backend: str, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
    """One graph per time-step group on openvino (each compiles in about a second); the simulation otherwise.

    The int8-x86 graphs compile per batch-size bucket in about a minute each: times the groups, that is no
    start-up anyone waits for, so they are refused (auto falls back to fake when openvino is missing)."""
    if backend in INT8_BACKENDS:
        raise BackendUnavailable(f"{backend} does not run time-step groups (timestep_groups > 1); use 'openvino' "
                                 "or 'fake'")
    resolved = resolve_backend(backend, True, next(unet.parameters()).device)
    if resolved in ("eager", "fake"):
        return unet
    if resolved in INT8_BACKENDS:  # auto without openvino
        logger.info("auto backend: time-step groups run as fake quant without openvino")
        return unet
    # Float groups exist for accuracy, so they stay fp32 whatever the quantized groups' float ops run in: in bf16 the
    # noise-end half breaks seeds (faithful, DDIM-25, N=2000: worst image 14.3 dB against 31.1 in fp32; RESULTS.md).
    float_backend = "openvino-fp32" if resolved in OPENVINO_BACKENDS else "eager"

    def build(member: nn.Module) -> nn.Module:
        return build_executor(member, backend if is_quantized(member) else float_backend, max_batch, cache_dir)

    return unet.map(build)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a model computes with: parameters and buffers, or an exported graph's constants.

    For an ExecutableUNet, the graph built for its largest batch (what a serving process keeps per bucket);
    for an OpenVINO executor, its compiled model's constants.
    """
    if hasattr(module, "weight_bytes") and callable(module.weight_bytes):
        return int(module.weight_bytes())
    if isinstance(module, ExecutableUNet):
        if not module.graph_modules:
            raise ValueError("no graph built yet; call warmup() first")
        module = module.graph_modules[max(module.graph_modules)]
    tensors: dict[int, torch.Tensor] = {}
    if isinstance(module, torch.fx.GraphModule):  # only what the graph reads (export keeps unused originals)
        for node in module.graph.nodes:
            if node.op == "get_attr":
                value = module
                for part in str(node.target).split("."):
                    value = getattr(value, part)
                if isinstance(value, torch.Tensor):
                    tensors[value.data_ptr()] = value
    else:
        for t in (*module.parameters(), *module.buffers()):
            tensors[t.data_ptr()] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())
