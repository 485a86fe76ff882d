"""Which layers are fed a skip concat, and where it splits (QuantConfig.split_concat).

The split point is not read from a block's config (diffusers' up blocks derive it from constructor arguments they
do not keep): one forward runs under a torch function mode that records every two-way channel `torch.cat` of
feature maps, and a layer whose input *is* one of those outputs (the same tensor object, as the up blocks' resnets
hand the concat to conv_shortcut) is split where the first operand ends. Layers that see the concat only after
another op (conv1, after GroupNorm and SiLU) are not split: their input has one distribution again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from quantizer.ptq.quant_modules import QuantConv2d, SplitActQuantizer

SPLIT_KEY = ".input_quantizer.split"


class _CatRecorder(TorchFunctionMode):
    """Records {id(output): (output, channels of the first operand)} of every torch.cat([a, b], dim=1) on 4-D maps."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[int, tuple[torch.Tensor, int]] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.cat and isinstance(out, torch.Tensor) and out.ndim == 4:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim in (1, -3) and len(tensors) == 2 and 0 < tensors[0].shape[1] < out.shape[1]:
                self.outputs[id(out)] = (out, int(tensors[0].shape[1]))  # the tensor is kept: ids stay unique
        return out


@torch.no_grad()
def find_concat_splits(unet: nn.Module, forward: Callable[[], object]) -> dict[str, int]:
    """{conv name: channels of the first half} for every quantized conv whose input is a channel concat in
    one run of forward() (e.g. lambda: unet(x, t))."""
    recorder = _CatRecorder()
    found: dict[str, int] = {}

    def watch(name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            hit = recorder.outputs.get(id(args[0])) if args else None
            if hit is not None and hit[0] is args[0]:
                found[name] = hit[1]
        return pre_hook

    handles = [m.register_forward_pre_hook(watch(n)) for n, m in unet.named_modules() if isinstance(m, QuantConv2d)]
    try:
        with recorder:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return found


def splits_in_stats(stats: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The split layers exported stats describe: {conv name: channels of the first half}."""
    return {key.removesuffix(SPLIT_KEY): int(value) for key, value in stats.items() if key.endswith(SPLIT_KEY)}


def split_inputs(unet: nn.Module, splits: Mapping[str, int]) -> None:
    """Give each named quantized conv a SplitActQuantizer at its split point (same bits as its input had)."""
    for name, split in splits.items():
        layer = unet.get_submodule(name)
        if not isinstance(layer, QuantConv2d):
            raise ValueError(f"split input for {name!r}, which is not a quantized Conv2d")
        if not 0 < split < layer.layer.in_channels:
            raise ValueError(f"split point {split} of {name!r} is outside its {layer.layer.in_channels} channels")
        if not isinstance(layer.input_quantizer, SplitActQuantizer):
            bits = int(layer.input_quantizer.bits)
            layer.input_quantizer = SplitActQuantizer(bits, split).to(layer.layer.weight.device)
