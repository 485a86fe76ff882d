"""The backend registry: a backend is one registered object, found by name, listed, and weighed by auto."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantizer.execution import executor
from quantizer.execution.backends import Backend, get_backend, register_backend, unregister_backend
from quantizer.execution.executor import BACKENDS, BackendUnavailable, build_executor, resolve_backend


class Wrapped(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet


class Toy(Backend):
    """A float-only backend auto prefers to eager, when it is available and takes the model."""

    name = "toy"
    needs_quantized = False
    auto_rank = 0

    def __init__(self) -> None:
        super().__init__()
        self.unavailable: str | None = None
        self.rejects: str | None = None

    def availability(self, device: torch.device) -> str | None:
        return self.unavailable

    def check_model(self, unet: nn.Module) -> None:
        super().check_model(unet)
        if self.rejects:
            raise ValueError(self.rejects)

    def build(self, unet, max_batch, cache_dir):
        return Wrapped(unet)


def get_registered() -> tuple[str, ...]:
    return executor.BACKENDS  # read now (the imported BACKENDS is the list at import time)


@pytest.fixture
def toy():
    backend = register_backend(Toy())
    yield backend
    if "toy" in get_registered():
        unregister_backend("toy")
    assert get_registered() == BACKENDS


def test_a_registered_backend_is_listed_resolved_and_built_by_name(toy, tiny_unet):
    assert get_registered()[-1] == "toy" and get_registered()[:-1] == BACKENDS
    assert resolve_backend("toy", quantized=False) == "toy"
    assert build_executor(tiny_unet, "toy").unet is tiny_unet
    with pytest.raises(BackendUnavailable, match="needs a quantized model|runs unquantized"):
        resolve_backend("toy", quantized=True)
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Toy())

    unregister_backend("toy")
    assert get_registered() == BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("toy", quantized=False)


def test_auto_takes_the_preferred_available_backend_that_takes_the_model(toy, tiny_unet):
    assert resolve_backend("auto", quantized=False) == "toy"  # rank 0 before eager's
    assert resolve_backend("auto", quantized=True) != "toy"  # a float-only backend is no candidate for fake quant
    assert isinstance(build_executor(tiny_unet, "auto"), Wrapped)

    toy.unavailable = "toy is unavailable here: no toy hardware"
    assert resolve_backend("auto", quantized=False) == "eager"
    with pytest.raises(BackendUnavailable, match="no toy hardware"):
        build_executor(tiny_unet, "toy")

    toy.unavailable, toy.rejects = None, "toy cannot run this model"
    assert build_executor(tiny_unet, "auto") is tiny_unet  # auto falls back to the simulation
    with pytest.raises(ValueError, match="cannot run this model"):
        build_executor(tiny_unet, "toy")


def test_the_built_in_backends_are_registered_once_each():
    assert len(set(BACKENDS)) == len(BACKENDS) and BACKENDS[0] == "auto"
    assert get_backend("int8-x86").needs_quantized and get_backend("openvino-fp32").needs_quantized is False
    assert get_backend("openvino").runs_prompts and not get_backend("int8-x86").runs_prompts
    with pytest.raises(ValueError, match="resolver"):
        register_backend(Backend("auto"))


def test_every_backend_the_service_accepts_is_registered_and_serves_quantized_models():
    """The service's list is hand-written (its API process must not import torch to read the registry): it may
    only name registered backends that run quantized models (or auto)."""
    from service.settings import SERVED_BACKENDS

    for name in SERVED_BACKENDS:
        assert name in BACKENDS, name
        if name != "auto":
            assert get_backend(name).needs_quantized is not False, name
