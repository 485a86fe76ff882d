"""quantize_model: the one call a service worker makes at startup (cache lookup, calibration, quantize_ a copy)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import quantizer
from quantizer.diffusion.models import DiffusionModel
from quantizer.diffusion.prompts import DEFAULT_GUIDANCE_SCALE, builtin_prompts
from quantizer.ptq.cache import CalibrationCache, cache_key, canonical_json, hash_state_dict, hash_tensor
from quantizer.ptq.calibration import CalibrationSet, build_calibration_set
from quantizer.ptq.config import (
    LIBRARY_PRESET,
    PRESETS,
    CalibrationConfig,
    PTQ4DMConfig,
    QuantConfig,
    quant_config_for,
)
from quantizer.ptq.noise_correction import NoiseCorrectedUNet, estimate, record_pairs
from quantizer.ptq.progress import ProgressFn, ProgressLog
from quantizer.ptq.quant_modules import run_residual
from quantizer.ptq.quantize import export_stats, load_stats, quantize_, restore_float_layers
from quantizer.ptq.timestep_groups import (
    WEIGHT_KEY,
    TimestepGroupedUNet,
    group_edges,
    is_grouped,
    pack,
    share_weights,
    split_calibration,
    unpack,
)

logger = logging.getLogger(__name__)

# A model directory may ship its calibration statistics here (the cache format, read-only), so a first start
# calibrates nothing.
SHIPPED_CALIBRATION_DIR = "calibration"

# Bump when the meaning of exported stats changes (quantizer layout, grids), so old cache entries miss.
STATS_FORMAT = 1
# The same for the noise-correction statistics (cached as entries of their own).
CORRECTION_FORMAT = 1

_QUANT_FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}
_CALIBRATION_FIELDS = {f.name for f in dataclasses.fields(CalibrationConfig)}


@dataclass
class QuantizedModel(DiffusionModel):
    """A DiffusionModel with a fake-quantized UNet, plus what identifies its calibration.

    calibration_hash: sha256 of the exported stats (changes whenever the quantized model does).
    cache_key: the calibration-cache key of the inputs (model weights, configs, versions).
    stats_source: 'shipped' (the model directory's calibration/), 'cache' (cache_dir) or 'calibrated'.
    """

    precision: str = ""
    config: PTQ4DMConfig | None = None
    calibration_hash: str | None = None
    cache_key: str | None = None
    cache_hit: bool = False
    stats_source: str = "calibrated"


def build_config(precision: str | QuantConfig,
                 overrides: CalibrationConfig | Mapping[str, Any] | None = None) -> PTQ4DMConfig | None:
    """PTQ4DMConfig for a precision plus overrides; None for 'fp32'.

    overrides: a CalibrationConfig, or a mapping of CalibrationConfig / QuantConfig field names (flat, or nested
    under 'calibration' / 'quant') plus an optional 'preset' (a key of PRESETS, default 'ptq4dm': the paper's
    method) whose values the other overrides replace. Bit widths come from the precision; unknown names raise
    ValueError.
    """
    quant = quant_config_for(precision) if isinstance(precision, str) else precision
    if quant is None:
        return None
    if not isinstance(quant, QuantConfig):
        raise TypeError(f"precision must be a string or QuantConfig, got {type(precision).__name__}")
    if overrides is None or isinstance(overrides, CalibrationConfig):
        return PTQ4DMConfig(quant=quant, calibration=overrides or CalibrationConfig())
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a CalibrationConfig or a mapping, got {type(overrides).__name__}")
    flat = dict(overrides)
    preset = flat.pop("preset", LIBRARY_PRESET)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    for section in ("quant", "calibration"):
        nested = flat.pop(section, None) or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"overrides[{section!r}] must be a mapping")
        flat.update(nested)
    flat = {**PRESETS[preset], **flat}
    unknown = sorted(set(flat) - _QUANT_FIELDS - _CALIBRATION_FIELDS)
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(_CALIBRATION_FIELDS | _QUANT_FIELDS))}")
    for name in ("weight_bits", "act_bits"):
        if name in flat and flat[name] != getattr(quant, name):
            raise ValueError(f"{name} is set by the precision ({getattr(quant, name)}), not by overrides")
    quant = dataclasses.replace(quant, **{k: v for k, v in flat.items() if k in _QUANT_FIELDS})
    calibration = CalibrationConfig(**{k: v for k, v in flat.items() if k in _CALIBRATION_FIELDS})
    return PTQ4DMConfig(quant=quant, calibration=calibration)


def cache_key_parts(model: DiffusionModel, config: PTQ4DMConfig,
                    real_images: torch.Tensor | None = None) -> dict[str, Any]:
    """Everything the stats depend on: model weights and scheduler, both configs, library and stats format."""
    parts: dict[str, Any] = {
        "model_weights": hash_state_dict(model.unet),
        "scheduler_config": {k: v for k, v in sorted(model.scheduler_config.items()) if not k.startswith("_")},
        "config": _stats_config(config),
        "ptq4dm": quantizer.__version__,
        "stats_format": STATS_FORMAT,
    }
    if config.calibration.method == "real_noised" and real_images is not None:
        parts["real_images"] = hash_tensor(real_images)
    if model.text_encoder is not None:  # text-to-image: the prompts' embeddings and the guidance shape x_t
        parts["text"] = {"text_encoder": hash_state_dict(model.text_encoder), "guidance_scale": DEFAULT_GUIDANCE_SCALE,
                         "prompts": hashlib.sha256("\n".join(builtin_prompts()).encode()).hexdigest()}
    return parts


def _stats_config(config: PTQ4DMConfig) -> dict[str, Any]:
    """The config as the statistics see it: float_groups (and float_groups_by_steps, float_group_mode) only choose
    which groups run them and how, noise_correction is estimated after them (an entry of its own)."""
    out = config.to_dict()
    out["quant"].pop("float_groups", None)
    out["quant"].pop("float_group_layers", None)
    out["quant"].pop("float_groups_by_steps", None)
    out["quant"].pop("float_group_mode", None)
    out["quant"].pop("noise_correction", None)
    return out


def _noise_correction(model: DiffusionModel, config: PTQ4DMConfig, unet: torch.nn.Module, stats_hash: str,
                      parts: dict[str, Any], cache_dir: str | Path | None, label: str, progress: bool,
                      report: ProgressFn) -> dict[str, torch.Tensor]:
    """The noise-correction statistics of this quantized UNet (quantizer.ptq.noise_correction): a cache entry of
    their own, keyed by the calibration's key parts, the whole config (float_groups changes the quantized
    outputs) and the hash of the statistics they were measured on, so configs without the option keep their keys
    and a config with it reuses their calibration."""
    key_parts = {**parts, "config": config.to_dict(), "stats": stats_hash, "noise_correction_format": CORRECTION_FORMAT}

    def compute() -> dict[str, torch.Tensor]:
        pairs = record_pairs(model.unet, model.scheduler_config, config.calibration, text_encoder=model.text_encoder,
                             on_progress=report)
        return estimate(unet, pairs, int(model.scheduler_config["num_train_timesteps"]),
                        config.quant.noise_correction, progress=progress, on_progress=report)

    if cache_dir is None:
        return compute()
    return CalibrationCache(cache_dir).get_or_compute(key_parts, compute, extra={
        "model": model.name, "precision": label, "noise_correction": config.quant.noise_correction})


# The calibration set depends on the FP model and CalibrationConfig only, not on the precision: a worker that
# serves several precisions builds it once. Small (N x C x H x W floats), so a couple are kept.
_CALIBRATION_SETS: OrderedDict[str, CalibrationSet] = OrderedDict()
_CALIBRATION_SETS_MAX = 2
_CALIBRATION_LOCK = threading.Lock()


def _calibration_set(model: DiffusionModel, calibration: CalibrationConfig, parts: dict[str, Any],
                     real_images: torch.Tensor | None, progress: bool,
                     on_progress: ProgressFn | None = None) -> CalibrationSet:
    key = cache_key({k: v for k, v in parts.items() if k != "config"} | {"calibration": calibration.to_dict()})
    with _CALIBRATION_LOCK:
        if key in _CALIBRATION_SETS:
            _CALIBRATION_SETS.move_to_end(key)
            return _CALIBRATION_SETS[key]
    calib = build_calibration_set(model.unet, model.scheduler_config, calibration, real_images, progress,
                                  on_progress, text_encoder=model.text_encoder)
    with _CALIBRATION_LOCK:
        _CALIBRATION_SETS[key] = calib
        while len(_CALIBRATION_SETS) > _CALIBRATION_SETS_MAX:
            _CALIBRATION_SETS.popitem(last=False)
    return calib


def _calibrate_grouped(model: DiffusionModel, config: PTQ4DMConfig, calib: CalibrationSet, progress: bool,
                       report: ProgressFn) -> tuple[TimestepGroupedUNet, dict[str, torch.Tensor]]:
    """Activation ranges calibrated per time-step group (quantizer.ptq.timestep_groups); weights once, by the
    first group, on the whole set (GPTQ rounding sees every time-step), and shared by the others."""
    edges = group_edges(int(model.scheduler_config["num_train_timesteps"]), config.quant.timestep_groups)
    group_stats: list[dict[str, torch.Tensor]] = []
    for g, part in enumerate(split_calibration(calib, edges)):
        def in_group(stage: str, done: int, total: int, g: int = g) -> None:
            report(f"group {g + 1}/{len(edges)} {stage}", done, total)

        weights = {k: v for k, v in group_stats[0].items() if WEIGHT_KEY in k} if group_stats else None
        group_stats.append(export_stats(quantize_(copy.deepcopy(model.unet), config, calibration=part,
                                                  progress=progress, on_progress=in_group, weight_calibration=calib,
                                                  weights=weights)))
    return _grouped_unet(model, config, group_stats, edges), pack(group_stats, edges)


def _grouped_unet(model: DiffusionModel, config: PTQ4DMConfig, group_stats: list[dict[str, torch.Tensor]],
                  edges: list[int]) -> TimestepGroupedUNet:
    """One fake-quant member per group, all on the first group's quantized weights (every group shares them)
    and each with its own activation ranges."""
    base = quantize_(copy.deepcopy(model.unet), config, stats=group_stats[0], progress=False)

    def member_of(stats: dict[str, torch.Tensor]) -> torch.nn.Module:  # the base's weights, these ranges
        member = share_weights(base)
        load_stats(member, {k: group_stats[0][k] if WEIGHT_KEY in k else v for k, v in stats.items()})
        return member

    quant = config.quant
    quantized = len(edges) - quant.float_groups  # the float groups' stats exist but are not run
    members = [base, *(member_of(stats) for stats in group_stats[1:quantized])]
    # one float copy serves every whole-float group, and the extra ones of long requests (float_groups_by_steps)
    in_fp32 = quant.float_group_mode == "fp32" and not quant.float_group_layers
    whole_float = bool(quant.float_groups and in_fp32) or bool(quant.float_groups_by_steps)
    float_member = copy.deepcopy(model.unet).eval() if whole_float else None
    if quant.float_group_layers or quant.float_group_mode == "residual":
        # int8 on each float group's own ranges (plus the residual pass), but for the named layers
        finer = run_residual if quant.float_group_mode == "residual" else (lambda member: member)
        members += [restore_float_layers(finer(member_of(stats)), model.unet, quant.float_group_layers)
                    for stats in group_stats[quantized:]]
    else:
        members += [float_member] * quant.float_groups
    return TimestepGroupedUNet(members, edges, float_member, quant.float_groups_by_steps).eval()


def shipped_stats(model: DiffusionModel, parts: dict[str, Any], label: str) -> dict[str, torch.Tensor] | None:
    """The stats shipped in the model's directory for exactly these key parts, or None.

    A shipped entry for the same precision that does not match is worth a warning naming what differs (the
    weights, the config or the library version changed since it was made): the fallback calibrates for minutes.
    """
    if model.path is None or not (model.path / SHIPPED_CALIBRATION_DIR).is_dir():
        return None
    shipped = CalibrationCache(model.path / SHIPPED_CALIBRATION_DIR, read_only=True)
    stats = shipped.load(parts)
    if stats is not None:
        return stats
    wanted = json.loads(canonical_json(parts))
    for manifest in shipped.manifests():
        if (manifest.get("extra") or {}).get("precision") != label:
            continue
        theirs = manifest.get("key_parts") or {}
        differing = sorted(k for k in wanted.keys() | theirs.keys() if wanted.get(k) != theirs.get(k))
        if "config" in differing:
            continue  # made for another calibration config (e.g. another method): not meant for this request
        logger.warning("the %s calibration shipped with %s was made for other inputs (%s differ); calibrating",
                       label, model.name, ", ".join(differing))
    return None


def quantize_model(model: DiffusionModel, precision: str | QuantConfig,
                   calibration_config: CalibrationConfig | Mapping[str, Any] | None = None,
                   cache_dir: str | Path | None = None, real_images: torch.Tensor | None = None,
                   progress: bool = True, on_progress: ProgressFn | None = None) -> DiffusionModel:
    """A QuantizedModel whose UNet is a quantized copy of model.unet (model itself is left untouched).

    precision: 'w8a8', 'w4a8', 'w8a6', 'w8a16', any valid 'w<b>a<b>', a QuantConfig, or 'fp32' (returns
    `model` itself). calibration_config: see build_config. With cache_dir the stats are looked up first
    and a hit runs no calibration at all; a miss calibrates and stores them. Stats shipped in the model's
    directory (SHIPPED_CALIBRATION_DIR) come first and are never written. real_images is required by
    the 'real_noised' calibration method. on_progress hears every calibration stage (default: log lines with ETA).
    """
    config = build_config(precision, calibration_config)
    if config is None:
        return model
    label = precision if isinstance(precision, str) else f"w{config.quant.weight_bits}a{config.quant.act_bits}"
    calibrated: dict[str, torch.nn.Module] = {}

    parts = cache_key_parts(model, config, real_images)
    report = on_progress or ProgressLog(f"calibrating {model.name}/{label}", logger)

    def compute() -> dict[str, torch.Tensor]:
        calib = _calibration_set(model, config.calibration, parts, real_images, progress, report)
        if config.quant.timestep_groups > 1:
            calibrated["unet"], stats = _calibrate_grouped(model, config, calib, progress, report)
            return stats
        calibrated["unet"] = quantize_(copy.deepcopy(model.unet), config, calibration=calib, progress=progress,
                                       on_progress=report)
        return export_stats(calibrated["unet"])

    stats, source = shipped_stats(model, parts, label), "shipped"
    if stats is None and cache_dir is None:
        stats, source = compute(), "calibrated"
    elif stats is None:
        stats = CalibrationCache(cache_dir).get_or_compute(parts, compute, extra={"model": model.name,
                                                                                  "precision": label})
        source = "calibrated" if "unet" in calibrated else "cache"
    hit = "unet" not in calibrated
    if hit and is_grouped(stats):
        calibrated["unet"] = _grouped_unet(model, config, *unpack(stats))
    elif hit:
        calibrated["unet"] = quantize_(copy.deepcopy(model.unet), config, stats=stats, progress=progress)
    unet, calibration_hash = calibrated["unet"].eval(), hash_state_dict(stats)
    if config.quant.noise_correction != "none":
        correction = _noise_correction(model, config, unet, calibration_hash, parts, cache_dir, label, progress,
                                       report)
        unet = NoiseCorrectedUNet(unet, correction).eval()
        calibration_hash = hash_state_dict({**stats, **correction})
    logger.info("%s quantized to %s (stats: %s)", model.name, label, source)
    return QuantizedModel(name=model.name, unet=unet, scheduler_config=model.scheduler_config,
                          precision=label, config=config, calibration_hash=calibration_hash,
                          cache_key=cache_key(parts), cache_hit=hit, stats_source=source, path=model.path,
                          decoder=model.decoder, text_encoder=model.text_encoder)
