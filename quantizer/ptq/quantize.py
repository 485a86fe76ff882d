"""quantize_(unet, config): swap in fake-quant layers, calibrate (or load) their ranges, switch to quantized mode.

Calibration is one pass of the calibration set through the *full-precision* network (observers see FP
weights and FP upstream activations, so a single forward per batch suffices), followed by a per-quantizer
range search on the pooled samples. Weight ranges need no data and are searched directly on the weights.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
import warnings
import zlib
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from quantizer.ptq import gptq
from quantizer.ptq.calibration import CalibrationSet
from quantizer.ptq.concat_split import find_concat_splits, split_inputs, splits_in_stats
from quantizer.ptq.config import PTQ4DMConfig, QuantConfig
from quantizer.ptq.progress import ProgressFn, track
from quantizer.ptq.quant_modules import (
    MAX_VALUES_PER_BATCH,
    ActObserver,
    ActQuantizer,
    NonFiniteActivation,
    QuantAttnProcessor,
    QuantConv2d,
    QuantLayer,
    QuantLinear,
    SplitActQuantizer,
    WeightQuantizer,
)
from quantizer.ptq.scale_search import search_act_qparams, search_weight_scale

logger = logging.getLogger(__name__)
STATS_BUFFERS: tuple[str, ...] = ("scale", "zero_point", "bits", "rounded", "split")  # what export_stats keeps

# Layers with weights that quantize_ cannot wrap; they must be listed in QuantConfig.skip.
UNSUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
    nn.MultiheadAttention,
)


def quantize_(unet: nn.Module, config: PTQ4DMConfig | QuantConfig, calibration: CalibrationSet | None = None,
              stats: dict[str, torch.Tensor] | None = None, progress: bool = True,
              on_progress: ProgressFn | None = None, weight_calibration: CalibrationSet | None = None,
              weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Quantize `unet` in place (fake quant) and return it.

    With `stats` (from export_stats) every scale/zero-point is loaded and no forward pass runs at all;
    otherwise `calibration` inputs are run through the model to set the activation ranges.
    weight_calibration: the inputs GPTQ rounding fits the weights on (default `calibration`; time-step groups
    round once on the whole set). weights: the weight entries of another run's stats, taken instead of searching
    and rounding again (the groups after the first).
    On any error the original layers are put back.
    """
    qcfg = config.quant if isinstance(config, PTQ4DMConfig) else config
    if not isinstance(qcfg, QuantConfig):
        raise TypeError(f"config must be a PTQ4DMConfig or QuantConfig, got {type(config).__name__}")
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
    if any(isinstance(m, (QuantLayer, QuantAttnProcessor)) for m in unet.modules()):
        raise ValueError("unet is already quantized")
    if stats is None and calibration is None:
        raise ValueError("quantize_ needs either a calibration set or stats")
    if stats is None and len(calibration) == 0:
        raise ValueError("calibration set is empty")
    undo = _swap_modules(unet, qcfg)
    try:
        if qcfg.split_concat:
            _split_concat_inputs(unet, stats, calibration)
        if stats is not None:
            load_stats(unet, stats)
        else:
            _calibrate(unet, qcfg, calibration, progress, on_progress, weight_calibration or calibration, weights)
        set_mode(unet, "quant")
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise
    return unet


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantized layer / attention processor of `model` into 'fp', 'observe' or 'quant' mode."""
    for module in model.modules():
        if isinstance(module, (QuantLayer, QuantAttnProcessor)):
            module.set_mode(mode)


def _quantizers(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer | ActQuantizer | SplitActQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer, SplitActQuantizer)):
            yield name, module


def _stats_buffers(quantizer: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The quantizer's own registered buffers that export_stats keeps (properties such as a split's bits are not)."""
    own = dict(quantizer.named_buffers(recurse=False))
    for buffer in STATS_BUFFERS:
        if own.get(buffer) is not None:
            yield buffer, own[buffer]


def _split_concat_inputs(unet: nn.Module, stats: dict[str, torch.Tensor] | None,
                         calibration: CalibrationSet | None) -> None:
    """QuantConfig.split_concat: the split points from the stats, or found in one forward of a calibration input."""
    if stats is not None:
        split_inputs(unet, splits_in_stats(stats))
        return
    param = next(unet.parameters())
    xs, ts, extra = next(calibration.inputs(1))  # with the sample's class label / text embeddings, if any
    splits = find_concat_splits(unet, lambda: unet(xs.to(device=param.device, dtype=param.dtype), ts.to(param.device),
                                                   **_on_device(extra, param.device)))
    if not splits:
        warnings.warn("split_concat: no quantized layer is fed a channel concat; nothing is split", RuntimeWarning,
                      stacklevel=3)
    split_inputs(unet, splits)
    logger.info("split_concat: %d layer inputs split (%s)", len(splits), ", ".join(sorted(splits)))


def export_stats(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer parameter as a flat {'<module>.scale' | '.zero_point' | '.bits': CPU tensor} dict."""
    stats: dict[str, torch.Tensor] = {}
    for name, quantizer in _quantizers(unet):
        for buffer, value in _stats_buffers(quantizer):
            stats[f"{name}.{buffer}"] = value.detach().cpu().clone().contiguous()
    if not stats:
        raise ValueError("unet has no quantizers: call quantize_ first")
    return stats


@torch.no_grad()
def load_stats(unet: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Copy exported parameters into `unet`'s quantizers; names, shapes and bit widths must match exactly."""
    expected = {f"{name}.{buf}": value for name, q in _quantizers(unet) for buf, value in _stats_buffers(q)}
    missing, unexpected = sorted(expected.keys() - stats.keys()), sorted(stats.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"stats do not match the model's quantizers: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for key, target in expected.items():
        value = stats[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"stats[{key!r}] has shape {tuple(getattr(value, 'shape', ()))}, "
                             f"expected {tuple(target.shape)}")
        if key.endswith(".bits") and int(value) != int(target):
            raise ValueError(f"stats[{key!r}] is {int(value)}-bit but the config quantizes it to {int(target)} bits")
        if key.endswith(".split") and int(value) != int(target):
            raise ValueError(f"stats[{key!r}] splits at channel {int(value)}, the model at {int(target)}")
        if key.endswith(".scale") and not (torch.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"stats[{key!r}] has non-positive or non-finite scales")
        if key.endswith(".zero_point"):
            levels = 2 ** int(stats[key.removesuffix("zero_point") + "bits"])
            if not (value == value.round()).all() or not 0 <= float(value) < levels:
                raise ValueError(f"stats[{key!r}] = {float(value)} is not an integer on the {levels}-level grid")
        if key.endswith(".rounded"):
            bound = 2 ** (int(stats[key.removesuffix("rounded") + "bits"]) - 1)
            if value.dtype != torch.int8 or int(value.min()) < -bound or int(value.max()) >= bound:
                raise ValueError(f"stats[{key!r}] is not an int8 tensor on the symmetric {2 * bound}-level grid")
    for key, target in expected.items():
        target.copy_(stats[key].to(device=target.device, dtype=target.dtype))
    for _, quantizer in _quantizers(unet):
        quantizer.sync()
    for module in unet.modules():
        if isinstance(module, QuantLayer):
            module.apply_rounded()


def resolve_negative_indices(pattern: str, unet: nn.Module) -> str:
    """'up_blocks.-1.resnets.*' -> 'up_blocks.3.resnets.*' on a UNet with four up blocks: a negative index after a
    top-level ModuleList counts from its end, so one pattern names the same part of UNets of any depth."""
    def index(match: re.Match[str]) -> str:
        blocks = getattr(unet, match.group(1), None)
        if not isinstance(blocks, nn.ModuleList) or not 1 <= int(match.group(2)) <= len(blocks):
            raise ValueError(f"pattern {pattern!r}: the UNet has no {match.group(1)}[-{match.group(2)}]")
        return f"{match.group(1)}.{len(blocks) - int(match.group(2))}"

    return re.sub(r"^(\w+)\.-(\d+)(?=\.|$)", index, pattern)


def restore_float_layers(unet: nn.Module, float_unet: nn.Module, patterns: tuple[str, ...]) -> nn.Module:
    """`unet` with each quantized layer whose name matches a pattern replaced by a copy of float_unet's layer of
    that name (full-precision weights and input); returns unet. Every backend then sees a plain Conv2d/Linear
    there and runs it in float. Patterns are fnmatch patterns of module names, with negative indices into
    top-level block lists (resolve_negative_indices). A pattern that matches no quantized layer raises ValueError."""
    try:
        patterns = tuple(resolve_negative_indices(p, unet) for p in patterns)
    except ValueError as error:  # name the field the user set
        raise ValueError(f"float_group_layers: {error}") from None
    names = [name for name, module in unet.named_modules() if isinstance(module, QuantLayer)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ValueError(f"float_group_layers: {unmatched} match no quantized layer (quantized: {names[:3]}...)")
    for name in names:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            unet.set_submodule(name, copy.deepcopy(float_unet.get_submodule(name)))
    return unet


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """A module is skipped when its name or any ancestor's name matches a pattern."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _check_wrappable(name: str, module: nn.Module) -> None:
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    if type(module).forward is not base.forward:
        raise TypeError(f"layer {name!r} of type {type(module).__name__} overrides forward and cannot be "
                        "quantized; add it to QuantConfig.skip")


def _swap_modules(unet: nn.Module, qcfg: QuantConfig) -> list:
    """Replace Conv2d/Linear layers (and attention processors) in place; returns undo callables."""
    # remove_duplicate=False: a layer shared by two parents is wrapped once and replaced in both.
    layers = [(n, m) for n, m in unet.named_modules(remove_duplicate=False) if isinstance(m, (nn.Conv2d, nn.Linear))]
    first_last = {layers[0][0], layers[-1][0]} if layers else set()
    for name, module in unet.named_modules():
        if isinstance(module, UNSUPPORTED_LAYERS) and not _skipped(name, qcfg.skip):
            raise TypeError(f"layer {name!r} of type {type(module).__name__} is not supported by quantize_; "
                            "add it to QuantConfig.skip")
    plans = []
    for name, module in layers:
        if _skipped(name, qcfg.skip) or (qcfg.keep_first_last_fp and name in first_last):
            continue
        _check_wrappable(name, module)
        plans.append((name, module))
    if not plans:
        raise ValueError("no Conv2d/Linear layer left to quantize (check QuantConfig.skip)")
    undo = []
    wrappers: dict[int, QuantLayer] = {}
    for name, module in plans:
        weight_bits, act_bits = qcfg.weight_bits_for(name), qcfg.act_bits
        if name in first_last and qcfg.first_last_bits is not None:
            weight_bits, act_bits = max(weight_bits, qcfg.first_last_bits), max(act_bits, qcfg.first_last_bits)
        if id(module) not in wrappers:
            cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
            wrappers[id(module)] = cls(module, weight_bits, act_bits)
            if qcfg.weight_rounding == "gptq" and gptq.supports(module):
                wrappers[id(module)].weight_quantizer.hold_rounded(module.weight)
        unet.set_submodule(name, wrappers[id(module)])
        undo.append(lambda n=name, m=module: unet.set_submodule(n, m))
    if qcfg.quantize_attention_matmuls:
        for name, module in unet.named_modules():
            if isinstance(module, Attention) and not _skipped(name, qcfg.skip):
                previous = module.processor
                module.set_processor(QuantAttnProcessor(qcfg.act_bits).to(next(module.parameters()).device))
                undo.append(lambda m=module, p=previous: m.set_processor(p))
    return undo


def _calibrate(unet: nn.Module, qcfg: QuantConfig, calibration: CalibrationSet, progress: bool,
               on_progress: ProgressFn | None, weight_calibration: CalibrationSet,
               weights: dict[str, torch.Tensor] | None) -> None:
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, QuantLayer)]
    if weights is not None:
        _load_weights(unet, layers, weights)
    else:
        for _name, layer in track(layers, "weight ranges", "layer", progress, on_progress):
            bits = int(layer.weight_quantizer.bits)
            layer.weight_quantizer.set_scale(search_weight_scale(
                layer.layer.weight, bits, qcfg.metric, qcfg.p, qcfg.n_candidates, qcfg.search))
        if qcfg.weight_rounding == "gptq":
            _round_weights(unet, layers, weight_calibration, progress, on_progress)

    act_quantizers = [(n, q) for n, q in _quantizers(unet) if isinstance(q, ActQuantizer)]
    n_batches = math.ceil(len(calibration) / calibration.config.batch_size)
    per_batch = min(MAX_VALUES_PER_BATCH, max(1, qcfg.act_samples // n_batches))
    for name, quantizer in act_quantizers:
        quantizer.observer = ActObserver(qcfg.act_samples, per_batch, seed=zlib.crc32(name.encode()), name=name)
    set_mode(unet, "observe")
    param = next(unet.parameters())
    try:
        with torch.no_grad():
            for xs, ts, extra in track(list(calibration.inputs()), "calibration forward", "batch", progress,
                                       on_progress):
                try:
                    unet(xs.to(device=param.device, dtype=param.dtype), ts.to(param.device),
                         **_on_device(extra, param.device))
                except NonFiniteActivation as exc:
                    raise _non_finite_error(exc, ts) from None
        for name, quantizer in track(act_quantizers, "activation ranges", "tensor", progress, on_progress):
            observer = quantizer.observer
            if observer is None or not observer.chunks:
                warnings.warn(f"{name} saw no activations during calibration; it keeps scale 1, zero_point 0",
                              RuntimeWarning, stacklevel=3)
                continue
            scale, zero_point = search_act_qparams(observer.values(), int(quantizer.bits), qcfg.metric, qcfg.p,
                                                   qcfg.n_candidates, qcfg.search, observer.lo, observer.hi,
                                                   qcfg.act_symmetric)
            _check_searched(name, scale, observer.lo, observer.hi)
            quantizer.set_qparams(scale, zero_point)
    finally:
        for _, quantizer in act_quantizers:
            quantizer.observer = None
    logger.info("calibrated %d layers and %d activation quantizers on %d samples",
                len(layers), len(act_quantizers), len(calibration))


def _load_weights(unet: nn.Module, layers: list[tuple[str, QuantLayer]], weights: dict[str, torch.Tensor]) -> None:
    """Weight scales (and rounded integers) of another calibration of the same model and config."""
    with torch.no_grad():
        for name, layer in layers:
            wq = layer.weight_quantizer
            for buffer in ("scale", "rounded"):
                if hasattr(wq, buffer):
                    key = f"{name}.weight_quantizer.{buffer}"
                    if key not in weights:
                        raise ValueError(f"weights lack {key!r}")
                    getattr(wq, buffer).copy_(weights[key])
            layer.apply_rounded()


def _round_weights(unet: nn.Module, layers: list[tuple[str, QuantLayer]], calibration: CalibrationSet,
                   progress: bool, on_progress: ProgressFn | None) -> None:
    """GPTQ: one full-precision pass records each layer's input Hessian, then each layer is rounded on it."""
    targets = {name: layer for name, layer in layers if hasattr(layer.weight_quantizer, "rounded")}
    param = next(unet.parameters())
    set_mode(unet, "fp")
    with torch.no_grad(), gptq.recording({n: m.layer for n, m in targets.items()}, targets) as hessians:
        for xs, ts, extra in track(list(calibration.inputs()), "weight rounding forward", "batch", progress,
                                   on_progress):
            unet(xs.to(device=param.device, dtype=param.dtype), ts.to(param.device), **_on_device(extra, param.device))
    for name, layer in track(list(targets.items()), "weight rounding (gptq)", "layer", progress, on_progress):
        wq = layer.weight_quantizer
        wq.rounded.copy_(gptq.gptq_round(layer.layer.weight, wq.scale.flatten(), wq.qrange,
                                         hessians[name].hessian()))
        layer.apply_rounded()


def _on_device(extra: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The calibration batch's other UNet inputs (class labels) where the model is."""
    return {name: value.to(device) for name, value in extra.items()}


def _tensor(quantizer_name: str) -> str:
    """'down.conv.input_quantizer' -> "the input of layer 'down.conv'"; other quantizers by their own name."""
    layer, _, leaf = quantizer_name.rpartition(".")
    if leaf in ("first", "second") and layer.endswith(".input_quantizer"):  # a SplitActQuantizer's half
        return f"the {leaf} half of the input of layer {layer.removesuffix('.input_quantizer')!r}"
    return f"the input of layer {layer!r}" if leaf == "input_quantizer" else f"the tensor of {quantizer_name!r}"


def _non_finite_error(exc: NonFiniteActivation, ts: torch.Tensor) -> ValueError:
    """Name the layer and the time-steps: NaN/inf in calibration is a property of the model or its sampler
    (e.g. a Fourier time embedding takes log(t) and a 'leading' DDIM spacing feeds t = 0), never data to fit."""
    rows = exc.rows if exc.batch == len(ts) else list(range(len(ts)))
    steps = sorted({int(t) for t in ts[rows]})
    return ValueError(f"calibration: non-finite values (NaN/inf) in {_tensor(exc.layer)} at "
                      f"time-step(s) {steps[:8]}{'...' if len(steps) > 8 else ''}; the full-precision model "
                      "itself produces them there, so no range can be calibrated (check the model's time "
                      "embedding and the sampler's time-step spacing)")


def _check_searched(name: str, scale: torch.Tensor, lo: float, hi: float) -> None:
    """A searched range that cannot quantize is an error; a degenerate one is reported: an input that was all
    zeros gets the floor scale, so whatever it carries at serving time is clipped to almost nothing."""
    if not (math.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"calibration: the searched scale of {_tensor(name)} is {float(scale)} (observed range "
                         f"[{lo}, {hi}])")
    if lo == hi == 0:
        warnings.warn(f"{_tensor(name)} saw only zeros during calibration: its range is degenerate (scale "
                      f"{float(scale):.3g}) and any non-zero input at serving time is clipped", RuntimeWarning,
                      stacklevel=4)
