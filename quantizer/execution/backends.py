"""The execution backends, one registered object each: what a backend runs, where, and how it builds.

`quantizer.execution.executor.build_executor(unet, name)` looks the name up here instead of testing strings, so
adding a backend is one `Backend` subclass and one `register_backend` call.

``auto`` is no backend of its own: it resolves to the first registered backend, in `auto_rank` order, that takes
this kind of model (quantized or not) and can run on the device. Built in, a quantized model runs on openvino, else
int8-x86 where the CPU has int8 kernels, else fake (and on fake off the CPU); a float one on eager. The last
candidate (the simulation, which runs anywhere) is also where auto goes when its choice rejects the model itself
(its grid, a prompt input, time-step groups): a second choice would cost another build for no gain in fidelity.

Heavy modules (openvino, torchao, the executor) are imported inside the methods that need them, so importing the
registry stays cheap and the implementation modules need not import it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantizer.diffusion.kinds import kind_of

if TYPE_CHECKING:
    from quantizer.ptq.timestep_groups import TimestepGroupedUNet

AUTO = "auto"
# What a backend that runs float models suggests for a quantized one (kept verbatim: callers match it).
QUANTIZED_HINT = "use 'fake', 'int8-x86' or 'openvino'"
# build_member(member, float_backend) builds one member of a time-step-grouped UNet (see Backend.build_grouped).
MemberBuilder = Callable[[nn.Module, str], nn.Module]


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (hardware, missing package) or not for this model."""


class Backend:
    """One way to run a UNet. Subclasses set the class attributes and override what differs.

    needs_quantized: True = fake-quant models only, False = float models only, None = either.
    runs_prompts: whether it runs text-to-image UNets (encoder_hidden_states as an input).
    runs_timestep_groups: whether build_grouped takes a time-step-grouped UNet.
    auto_rank: `auto`'s preference (lower first); None = auto never picks it.
    """

    name: str = ""
    needs_quantized: bool | None = None
    runs_prompts: bool = False
    runs_timestep_groups: bool = False
    auto_rank: int | None = None

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name
        if not self.name:
            raise ValueError(f"{type(self).__name__} needs a name")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def takes(self, quantized: bool) -> bool:
        return self.needs_quantized is None or self.needs_quantized == quantized

    def availability(self, device: torch.device) -> str | None:
        """Why it cannot run on `device` here (the BackendUnavailable message), or None when it can."""
        return None

    def check_model(self, unet: nn.Module) -> None:
        """Raise (BackendUnavailable, or ValueError naming the offending layer) when it cannot run this model."""
        if kind_of(unet.config).takes_prompt and not self.runs_prompts:
            raise BackendUnavailable(f"backend {self.name!r} does not run text-to-image UNets; use 'openvino' or "
                                     "'fake'")

    def build(self, unet: nn.Module, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
        """`unet` ready to run (called after check_model)."""
        raise NotImplementedError

    def build_grouped(self, grouped: TimestepGroupedUNet, build_member: MemberBuilder) -> nn.Module:
        """A time-step-grouped UNet ready to run (only called when runs_timestep_groups)."""
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make `backend` runnable by name (and a candidate for auto if it has an auto_rank); returns it."""
    if backend.name == AUTO:
        raise ValueError(f"{AUTO!r} is the resolver, not a backend name")
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> Backend:
    return _REGISTRY.pop(name)


def backend_names() -> tuple[str, ...]:
    """Every name build_executor takes: auto, then the backends in registration order."""
    return (AUTO, *_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {', '.join(backend_names())}, got {name!r}") from None


def auto_candidates(quantized: bool) -> list[Backend]:
    """The backends auto considers for this kind of model, most preferred first."""
    ranked = [b for b in _REGISTRY.values() if b.auto_rank is not None and b.takes(quantized)]
    return sorted(ranked, key=lambda b: b.auto_rank)  # type: ignore[arg-type, return-value]


def auto_fallback(quantized: bool) -> Backend:
    """Where auto goes when its choice rejects the model: its least preferred candidate, the simulation."""
    return auto_candidates(quantized)[-1]


def resolve(name: str, quantized: bool, device: torch.device | str = "cpu") -> Backend:
    """The backend `name` means for this model and device; BackendUnavailable if it cannot run."""
    device = torch.device(device)
    if name == AUTO:
        for candidate in auto_candidates(quantized):
            if candidate.availability(device) is None:
                return candidate
        raise BackendUnavailable(f"no registered backend runs a {'quantized' if quantized else 'float'} model on "
                                 f"{device}")
    backend = get_backend(name)
    if not backend.takes(quantized):
        if quantized:
            raise BackendUnavailable(f"backend {name!r} runs unquantized models; {QUANTIZED_HINT}")
        raise BackendUnavailable(f"backend {name!r} needs a quantized model (precision w<b>a<b>)")
    reason = backend.availability(device)
    if reason is not None:
        raise BackendUnavailable(reason)
    return backend


def _on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


class Simulation(Backend):
    """The model as it is, eager: fp32 (``eager``) or the PTQ4DM fake-quant simulation (``fake``; reference, any
    device, any bit width)."""

    runs_prompts = True
    runs_timestep_groups = True
    auto_rank = 100  # runs everything, everywhere: the last resort

    def __init__(self, name: str, quantized: bool) -> None:
        super().__init__(name)
        self.needs_quantized = quantized

    def build(self, unet: nn.Module, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
        return unet

    def build_grouped(self, grouped: TimestepGroupedUNet, build_member: MemberBuilder) -> nn.Module:
        return grouped


class TorchGraph(Backend):
    """torch.compile (inductor) of the fp32 model exported per batch-size bucket (``compiled``), or of its weights
    cast to bfloat16 (``bf16``, the mixed-precision baseline int8 must beat)."""

    needs_quantized = False

    def __init__(self, name: str, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(name)
        self.dtype = dtype

    def build(self, unet: nn.Module, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
        from quantizer.execution.executor import ExecutableUNet

        return ExecutableUNet(copy.deepcopy(unet).eval(), self.name, max_batch)

    def graph_module(self, unet: nn.Module, reference: nn.Module | None, batch: int,
                     example: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
        """The graph to compile for one batch size (`reference`: the fake-quant model, for backends needing it)."""
        from quantizer.execution.int8_x86 import UNetForward

        return torch.export.export(UNetForward(unet).eval(), example).module()

    def runner(self, compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """How the compiled graph is called (e.g. under autocast)."""
        return compiled


class Int8X86(TorchGraph):
    """Real int8 oneDNN kernels (VNNI/AMX) driven by PTQ4DM's scales, see `quantizer.execution.int8_x86`
    (``int8-x86``); ``int8-bf16-x86`` runs every other op (GroupNorm, SiLU, adds, attention) in bfloat16 (autocast
    over the int8 graph; needs AVX512-BF16 or AMX)."""

    needs_quantized = True
    auto_rank = 20

    def __init__(self, name: str, bf16: bool = False) -> None:
        super().__init__(name)
        self.bf16 = bf16
        if bf16:
            self.auto_rank = None

    def availability(self, device: torch.device) -> str | None:
        from quantizer.execution.int8_x86 import int8_supported, native_bf16

        if not _on_cpu(device):
            return f"{self.name} runs on the CPU; no int8 GPU backend is implemented (use 'fake')"
        reason = int8_supported()
        if reason is None and self.bf16 and not native_bf16():
            reason = "the CPU has no native bfloat16 (AVX512-BF16 / AMX)"
        return None if reason is None else f"{self.name} is unavailable here: {reason}"

    def check_model(self, unet: nn.Module) -> None:
        from quantizer.execution.int8_x86 import check_int8_grid

        super().check_model(unet)
        check_int8_grid(unet)  # ValueError naming the layer: fail now, not at the first batch

    def build(self, unet: nn.Module, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
        from quantizer.execution.executor import ExecutableUNet, float_weights_of

        return ExecutableUNet(float_weights_of(unet), self.name, max_batch, reference=unet)

    def graph_module(self, unet: nn.Module, reference: nn.Module | None, batch: int,
                     example: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
        from quantizer.execution.int8_x86 import drop_dtype_asserts, lower_int8_x86

        if reference is None:
            raise ValueError(f"{self.name} builds its graphs from the fake-quant model (reference=)")
        module = lower_int8_x86(unet, reference, batch)
        if self.bf16:
            drop_dtype_asserts(module)
        return module

    def runner(self, compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        from quantizer.execution.int8_x86 import under_bf16_autocast

        return under_bf16_autocast(compiled) if self.bf16 else compiled


class OpenVINO(Backend):
    """OpenVINO's CPU plugin, one dynamic-batch model, see `quantizer.execution.openvino`: ``openvino`` runs int8
    kernels driven by PTQ4DM's scales (FakeQuantize nodes around exactly the tensors PTQ4DM quantized, fp32
    elsewhere, so it computes what the simulation does); ``openvino-int8-bf16`` the same with every other op in bf16
    (faster, further from the simulation: docs/SENSITIVITY.md); ``openvino-fp32`` / ``openvino-bf16`` an unquantized
    model (their baselines)."""

    runs_prompts = True  # text embeddings are an input of the OpenVINO graph
    runs_timestep_groups = True

    def __init__(self, name: str, quantized: bool, precision: str) -> None:
        super().__init__(name)
        self.needs_quantized = quantized
        self.precision = precision
        # One graph for every batch size, built in seconds instead of half a minute per bucket, and it runs the
        # time-step groups of the served preset (at batch 16 int8-x86 is faster on the built-in model:
        # docs/BENCHMARKS.md).
        self.auto_rank = 10 if quantized and precision == "f32" else None

    def availability(self, device: torch.device) -> str | None:
        from quantizer.execution.openvino import cpu_bf16, openvino_unavailable

        if not _on_cpu(device):
            return f"{self.name} runs on the CPU (OpenVINO's CPU plugin); use 'fake' on other devices"
        reason = openvino_unavailable()
        if reason is None and self.precision == "bf16" and not cpu_bf16():
            reason = "OpenVINO's CPU plugin has no native bfloat16 on this CPU (OPTIMIZATION_CAPABILITIES lacks BF16)"
        return None if reason is None else f"{self.name} is unavailable here: {reason}"

    def check_model(self, unet: nn.Module) -> None:
        from quantizer.execution.openvino import check_openvino_grid

        super().check_model(unet)
        if self.needs_quantized:
            try:
                check_openvino_grid(unet)
            except ValueError as exc:
                raise BackendUnavailable(str(exc)) from exc

    def build(self, unet: nn.Module, max_batch: int, cache_dir: str | Path | None) -> nn.Module:
        from quantizer.execution.openvino import build_openvino

        return build_openvino(unet, self.name, max_batch, cache_dir, precision=self.precision)

    def build_grouped(self, grouped: TimestepGroupedUNet, build_member: MemberBuilder) -> nn.Module:
        """One graph per group (each compiles in about a second). Float groups exist for accuracy, so they stay
        fp32 whatever the quantized groups' float ops run in: in bf16 the noise-end half breaks seeds (faithful,
        DDIM-25, N=2000: worst image 14.3 dB against 31.1 in fp32; RESULTS.md)."""
        return grouped.map(lambda member: build_member(member, "openvino-fp32"))


for _backend in (Simulation("eager", quantized=False), TorchGraph("compiled"), TorchGraph("bf16", torch.bfloat16),
                 Simulation("fake", quantized=True), Int8X86("int8-x86"), Int8X86("int8-bf16-x86", bf16=True),
                 OpenVINO("openvino", True, "f32"), OpenVINO("openvino-int8-bf16", True, "bf16"),
                 OpenVINO("openvino-fp32", False, "f32"), OpenVINO("openvino-bf16", False, "bf16")):
    register_backend(_backend)
del _backend
