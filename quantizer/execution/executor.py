"""Execution backends: how a (possibly quantized) UNet is actually run.

One verb, `build_executor(model, backend)`, returns an `ExecutableUNet`: a drop-in for the UNet in `sample()`
(same call, `.config`, `.dtype`, `.device`). Which backends exist, what each runs and which one ``auto`` picks is
the registry's business: `quantizer.execution.backends` (its classes' docstrings describe them; `BACKENDS` lists
the names, `register_backend` adds one).

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
from quantizer.execution.backends import (
    AUTO,
    Backend,
    BackendUnavailable,
    TorchGraph,
    auto_fallback,
    backend_names,
    get_backend,
    resolve,
)
from quantizer.execution.int8_x86 import example_inputs
from quantizer.ptq.noise_correction import NoiseCorrectedUNet
from quantizer.ptq.quant_modules import QuantLayer
from quantizer.ptq.timestep_groups import TimestepGroupedUNet

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64


def __getattr__(name: str) -> object:
    """BACKENDS: every name build_executor takes, read from the registry when asked (so it lists backends
    registered after this import)."""
    if name == "BACKENDS":
        return backend_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_quantized(unet: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in unet.modules())


def resolve_backend(backend: str, quantized: bool, device: torch.device | str = "cpu") -> str:
    """The concrete backend `backend` means for this model and device; BackendUnavailable if it cannot run."""
    return resolve(backend, quantized, device).name


def float_weights_of(quant_unet: nn.Module) -> nn.Module:
    """An fp32 UNet with the quantized model's original weights (QuantLayer wrappers and attention hooks undone)."""
    unet = copy.deepcopy(quant_unet)
    for name, module in list(unet.named_modules()):
        if isinstance(module, QuantLayer):
            unet.set_submodule(name, module.layer)
    if hasattr(unet, "set_default_attn_processor"):
        unet.set_default_attn_processor()
    return unet.eval()


def bucket(batch: int, max_batch: int) -> int:
    """Smallest power of two >= batch, capped at max_batch."""
    return min(1 << (batch - 1).bit_length(), max_batch)


class ExecutableUNet(nn.Module):
    """A UNet behind a backend; call it like a UNet2DModel: unet(x_t, t).sample."""

    def __init__(self, unet: nn.Module, backend: str | Backend, max_batch: int = DEFAULT_MAX_BATCH,
                 reference: nn.Module | None = None) -> None:
        super().__init__()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._backend = get_backend(backend) if isinstance(backend, str) else backend
        self.backend = self._backend.name
        self.config = unet.config
        self.max_batch = max_batch
        self.compile_seconds: dict[int, float] = {}
        self._lock = threading.Lock()
        self._graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self.graph_modules: dict[int, nn.Module] = {}
        self._device = next(unet.parameters()).device
        self.class_conditional = kind_of(unet.config).class_conditional  # its graphs take class labels
        self._dtype = self._backend.dtype if isinstance(self._backend, TorchGraph) else torch.float32
        # `unet` is what the graphs are built from; `reference` (the fake-quant model) supplies int8 qparams.
        self.unet = unet.to(self._dtype)
        self.reference = reference

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def compiled(self) -> bool:
        return isinstance(self._backend, TorchGraph)

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
        module = self._backend.graph_module(self.unet, self.reference, batch, example)
        self.graph_modules[batch] = module
        graph = self._backend.runner(torch.compile(module))
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
    chosen = resolve(backend, quantized, next(unet.parameters()).device)
    try:
        chosen.check_model(unet)  # fail now, not at the first batch
    except (ValueError, BackendUnavailable) as exc:
        if backend != AUTO:
            raise
        chosen = auto_fallback(quantized)
        logger.info("auto backend: running %s (%s)", chosen.name, exc)
    return chosen.build(unet, max_batch, cache_dir)


def _build_grouped(unet: TimestepGroupedUNet, backend: str, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
    """A time-step-grouped UNet on `backend` (`Backend.build_grouped`): a graph per group on openvino, the
    simulation as is. int8-x86 compiles per batch-size bucket in about a minute each: times the groups, that is no
    start-up anyone waits for, so it is refused (auto then runs the simulation)."""
    chosen = resolve(backend, True, next(unet.parameters()).device)

    def build_member(member: nn.Module, float_backend: str) -> nn.Module:
        return build_executor(member, backend if is_quantized(member) else float_backend, max_batch, cache_dir)

    if not chosen.runs_timestep_groups:
        if backend != AUTO:
            raise BackendUnavailable(f"{chosen.name} does not run time-step groups (timestep_groups > 1); use "
                                     "'openvino' or 'fake'")
        logger.info("auto backend: time-step groups run as the simulation on %s", chosen.name)
        chosen = auto_fallback(True)
    return chosen.build_grouped(unet, build_member)


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
