"""Configuration of a PTQ4DM run: what to quantize and how (QuantConfig), what to calibrate on (CalibrationConfig).

Both are frozen and validated on construction (ValueError naming the field); `PTQ4DMConfig.stable_hash()` is
a deterministic digest of every field, used in the calibration-cache key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from quantizer.constants import PRECISION_PRESETS, SERVING_PRESET  # noqa: F401  (re-exported)
from quantizer.diffusion.sampling import SAMPLERS
from quantizer.ptq.fake_quant import ACT_BITS, WEIGHT_BITS, check_bits
from quantizer.ptq.scale_search import METRICS, SEARCH_METHODS

WEIGHT_ROUNDING: tuple[str, ...] = ("nearest", "gptq")
NOISE_CORRECTIONS: tuple[str, ...] = ("none", "bias", "ptqd")
FLOAT_GROUP_MODES: tuple[str, ...] = ("fp32", "residual")
CALIBRATION_METHODS: tuple[str, ...] = ("ndtc", "ndtc_code", "uniform", "single_step", "real_noised")
_PRECISION_RE = re.compile(r"^w(\d+)a(\d+)$")


def _check_int(value: object, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class QuantConfig:
    """What gets quantized and how its ranges are chosen.

    weight_bits / act_bits: per-channel symmetric weights (4..8) and per-tensor asymmetric layer inputs (6, 8, 16).
    search / metric / p / n_candidates: 'grid' tries n_candidates clipping ranges and keeps the one minimising
        `metric` (default the paper's L_p, p = 2.4); 'minmax' takes the full observed range.
    act_samples: activation values kept per quantizer for the search (a uniform subsample; min/max stay exact).
    keep_first_last_fp: leave the first and last layers (conv_in / conv_out in a diffusers UNet) unquantized.
    first_last_bits: otherwise they use at least this many bits for weights and inputs (PTQ4DM's code, after
        QDrop, keeps the stem and head at 8 bits); None gives them the same bits as every other layer.
    quantize_attention_matmuls: also quantize the operands of q.k^T and attn.v (off by default, like the
        authors' code, which only quantizes conv/linear layers).
    skip: fnmatch patterns of module names left in full precision, e.g. ("time_embedding.*",).
    weight_rounding: 'nearest' (the paper's) or 'gptq': integer weights chosen to minimise each layer's output
        error on the calibration inputs (quantizer.ptq.gptq), on the same searched scales. Not part of a
        config's hash when 'nearest'.
    float_groups: the last (noise-end) time-step groups run the full-precision UNet instead of the quantized one.
        Why: a DDIM trajectory decides what the image shows in its noise-end half, where the x_0 prediction
        multiplies the noise estimate's error by 1/sqrt(alpha_bar_t) (~100x); 1% of random error there turns some
        seeds into other objects, the same error at t < T/2 costs nothing (docs/RESULTS.md). The statistics do not
        depend on it (not part of the calibration-cache key). 0 (default) quantizes every group.
    float_group_layers: fnmatch patterns of quantized layers that alone run in full precision in the float groups;
        every other layer there runs int8 on that group's own ranges. Empty (default) = the whole UNet in full
        precision there. Why: the noise-end error of the int8 graph is spread thinly except for a few layers
        (docs/SENSITIVITY.md, "The noise end: which layers"), so floating those few keeps most of the accuracy of
        the fp32 half at most of the int8 speed. A pattern that matches no quantized layer is an error (it must
        never quietly leave the noise end all-int8). Not part of the calibration-cache key; not part of a config's
        hash when empty.
    float_groups_by_steps: (min_steps, groups) pairs: a request of at least min_steps sampler steps runs at least
        `groups` float groups (the most of float_groups and every pair it reaches), all of them the one
        full-precision member (float_group_layers must be empty unless float_group_mode is 'residual').
        Why: a group's int8 error adds up over the steps taken inside it; DDIM-100 takes 25 steps per quarter of
        the time-steps and keeps its images with t >= 500 in fp32, DDPM-1000 takes 250 and needs t >= 250 for its
        worst seeds (docs/RESULTS.md), so few-step requests keep the faster graphs. Not part of the
        calibration-cache key; not part of a config's hash when empty.
    float_group_mode: how the float groups run. 'fp32' (default): the full-precision UNet (or, with
        float_group_layers, int8 but for those layers). 'residual': the int8 UNet on each group's own ranges with a
        second 8-bit pass per layer input over the first one's rounding residual (ActQuantizer.residual: inputs on a
        ~16-bit grid, 8-bit weights; two int8 kernels per layer on OpenVINO). Why: the noise end needs an error far
        below int8's, and on CPUs whose fp32 FMAs do a quarter of an int8 dot product's work two int8 passes cost
        less than one fp32 pass (docs/RESULTS.md, docs/BENCHMARKS.md). A request that reaches a
        float_groups_by_steps pair runs all its float groups in full precision. With float_group_layers those layers
        run in full precision and every other one with its residual pass. Not part of the calibration-cache key;
        not part of a config's hash when 'fp32'.
    timestep_groups: activation ranges per group of diffusion time-steps (G equal groups of [0, T), each
        calibrated on its own share of the calibration set; quantizer.ptq.timestep_groups). 1 = the paper's one
        range per tensor. Not part of a config's hash when 1, so caches made before it existed stay valid.
    weight_bits_by_layer: fnmatch pattern of module names -> weight bits for those layers (the first matching
        pattern wins; activations keep act_bits), e.g. {"mid_block.*": 8} for W4A8 with the layers whose 4-bit
        weights cost most kept at 8 bits. Why: at W4A8 the weights carry the error (docs/SENSITIVITY.md), and a
        few layers dominate it, so a small budget of 8-bit weights buys most of it back. Not part of a config's
        hash when empty.
    split_concat: a layer whose input is a channel concat [h, skip] (the up blocks' conv_shortcut, fed the raw
        torch.cat of the decoder's features and the encoder's skip) gets one range per half, each searched on
        its own half like any other input (Q-Diffusion's split). Why: the two halves' ranges differ widely, so
        one range leaves the narrower half a few levels. Off by default (the paper's method); not part of a
        config's hash when off.
    noise_correction: 'none' (default, the paper's method), 'bias' (subtract the quantized noise estimate's mean
        error per output channel) or 'ptqd' (PTQD: also undo the part of the error proportional to the noise,
        eps_hat = (eps_q - b) / (1 + k)), both per bucket of diffusion time, estimated after quantization on FP
        trajectories (quantizer.ptq.noise_correction). Applies to every sampler, deterministic DDIM included;
        PTQD's variance-schedule calibration (stochastic samplers only) is not implemented. The calibration
        statistics do not depend on it; not part of a config's hash when 'none'.
    act_symmetric: every layer input's range is symmetric about zero (zero point at the middle of the unsigned
        grid, 128 at 8 bits; the search shrinks max(|lo|, hi) instead of [lo, hi]). Why: OpenVINO lowers such an
        input to an i8 kernel without a zero-point, 1.5x faster convolutions than u8 with a zero-point
        (docs/BENCHMARKS.md); the price is up to one bit of resolution on one-sided inputs. Off by default (the
        paper's asymmetric ranges); not part of a config's hash when off.
    """

    weight_bits: int = 8
    act_bits: int = 8
    search: str = "grid"
    metric: str = "lp"
    p: float = 2.4
    n_candidates: int = 100
    act_samples: int = 2**18
    keep_first_last_fp: bool = False
    first_last_bits: int | None = 8
    quantize_attention_matmuls: bool = False
    skip: tuple[str, ...] = ()
    timestep_groups: int = 1
    weight_rounding: str = "nearest"
    float_groups: int = 0
    float_group_layers: tuple[str, ...] = ()
    float_groups_by_steps: tuple[tuple[int, int], ...] = ()
    float_group_mode: str = "fp32"
    split_concat: bool = False
    weight_bits_by_layer: tuple[tuple[str, int], ...] = ()
    noise_correction: str = "none"
    act_symmetric: bool = False

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, WEIGHT_BITS, "weight_bits")
        object.__setattr__(self, "weight_bits_by_layer", _layer_bits(self.weight_bits_by_layer))
        _check_int(self.timestep_groups, "timestep_groups", 1)
        _check_int(self.float_groups, "float_groups", 0)
        if self.float_groups >= self.timestep_groups:
            raise ValueError(f"float_groups must be < timestep_groups ({self.timestep_groups}) so something is "
                             f"quantized, got {self.float_groups}")
        check_bits(self.act_bits, ACT_BITS, "act_bits")
        _check_choice(self.search, "search", SEARCH_METHODS)
        _check_choice(self.weight_rounding, "weight_rounding", WEIGHT_ROUNDING)
        _check_choice(self.noise_correction, "noise_correction", NOISE_CORRECTIONS)
        _check_choice(self.float_group_mode, "float_group_mode", FLOAT_GROUP_MODES)
        _check_choice(self.metric, "metric", METRICS)
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not self.p > 0:
            raise ValueError(f"p must be a positive number, got {self.p!r}")
        _check_int(self.n_candidates, "n_candidates", 1)
        _check_int(self.act_samples, "act_samples", 1)
        for name in ("keep_first_last_fp", "quantize_attention_matmuls", "split_concat", "act_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.first_last_bits is not None:  # must be valid for both weights and activations
            check_bits(self.first_last_bits, tuple(b for b in WEIGHT_BITS if b in ACT_BITS), "first_last_bits")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise ValueError(f"skip must be a sequence of module-name patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.float_group_layers, str) or not all(isinstance(s, str) and s
                                                               for s in self.float_group_layers):
            raise ValueError("float_group_layers must be a sequence of module-name patterns, got "
                             f"{self.float_group_layers!r}")
        object.__setattr__(self, "float_group_layers", tuple(self.float_group_layers))
        if self.float_group_layers and not self.float_groups:
            raise ValueError("float_group_layers needs float_groups >= 1 (the groups whose layers they name)")
        object.__setattr__(self, "float_groups_by_steps", _steps_groups(self.float_groups_by_steps))
        for steps, groups in self.float_groups_by_steps:
            if groups >= self.timestep_groups:
                raise ValueError(f"float_groups_by_steps[{steps}] must be < timestep_groups ({self.timestep_groups}) "
                                 f"so something is quantized, got {groups!r}")
        if self.float_groups_by_steps and self.float_group_layers and self.float_group_mode == "fp32":
            raise ValueError("float_groups_by_steps needs float_group_layers empty (its extra groups run the whole "
                             "UNet in full precision)")
        if self.float_group_mode != "fp32" and any(g < self.float_groups for _, g in self.float_groups_by_steps):
            raise ValueError("float_groups_by_steps: with float_group_mode 'residual' each pair's groups must be >= "
                             f"float_groups ({self.float_groups}): a request that reaches it runs them all in fp32")
        if self.float_groups_by_steps and self.noise_correction != "none":
            raise ValueError("float_groups_by_steps cannot be combined with noise_correction (the correction is "
                             "estimated on one set of float groups)")
        object.__setattr__(self, "p", float(self.p))

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "skip": list(self.skip)}
        if self.timestep_groups == 1:
            del out["timestep_groups"]
        if self.weight_rounding == "nearest":
            del out["weight_rounding"]
        if self.float_groups == 0:
            del out["float_groups"]
        if self.float_group_layers:
            out["float_group_layers"] = list(self.float_group_layers)
        else:
            del out["float_group_layers"]
        if self.float_groups_by_steps:
            out["float_groups_by_steps"] = {str(steps): groups for steps, groups in self.float_groups_by_steps}
        else:
            del out["float_groups_by_steps"]
        if self.float_group_mode == "fp32":
            del out["float_group_mode"]
        if not self.split_concat:
            del out["split_concat"]
        if self.weight_bits_by_layer:
            out["weight_bits_by_layer"] = dict(self.weight_bits_by_layer)
        else:
            del out["weight_bits_by_layer"]
        if self.noise_correction == "none":
            del out["noise_correction"]
        if not self.act_symmetric:
            del out["act_symmetric"]
        return out

    def float_groups_for(self, steps: int) -> int:
        """The float groups a request of `steps` sampler steps runs (float_groups_by_steps, else float_groups)."""
        return max([self.float_groups, *(groups for min_steps, groups in self.float_groups_by_steps
                                         if steps >= min_steps)])

    def for_steps(self, steps: int) -> QuantConfig:
        """This config as a request of `steps` steps runs it: float_groups resolved, float_groups_by_steps gone (equal
        to the config that always runs those float groups; full-precision ones once a pair is reached)."""
        if not any(steps >= min_steps for min_steps, _ in self.float_groups_by_steps):
            return replace(self, float_groups_by_steps=())
        return replace(self, float_groups=self.float_groups_for(steps), float_groups_by_steps=(),
                       float_group_mode="fp32", float_group_layers=())

    def weight_bits_for(self, name: str) -> int:
        """Weight bits of the layer called `name`: its pattern's in weight_bits_by_layer, else weight_bits."""
        return next((bits for pattern, bits in self.weight_bits_by_layer if fnmatch.fnmatchcase(name, pattern)),
                    self.weight_bits)


def _layer_bits(value: object) -> tuple[tuple[str, int], ...]:
    """weight_bits_by_layer as (pattern, bits) pairs in the given order, from a mapping or pairs."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        out = tuple((pattern, bits) for pattern, bits in pairs)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError("weight_bits_by_layer must map module-name patterns to weight bits, e.g. "
                         f"{{\"mid_block.*\": 8}}, got {value!r}") from None
    for pattern, bits in out:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"weight_bits_by_layer: patterns must be non-empty strings, got {pattern!r}")
        check_bits(bits, WEIGHT_BITS, f"weight_bits_by_layer[{pattern!r}]")
    return out


def _steps_groups(value: object) -> tuple[tuple[int, int], ...]:
    """float_groups_by_steps as (min_steps, float_groups) pairs sorted by min_steps, from a mapping (JSON keys are
    strings: "101") or pairs."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        out = [(int(steps) if isinstance(steps, str) and steps.isdigit() else steps, groups)
               for steps, groups in pairs]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError("float_groups_by_steps must map a step count to float groups, e.g. {\"101\": 3}, got "
                         f"{value!r}") from None
    for steps, groups in out:
        _check_int(steps, "float_groups_by_steps step count", 1)
        _check_int(groups, f"float_groups_by_steps[{steps}]", 1)
    if len({steps for steps, _ in out}) != len(out):
        raise ValueError(f"float_groups_by_steps names a step count twice: {value!r}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration set of UNet inputs (x_t, t) is built.

    method:
        'ndtc': the paper's Normally Distributed Time-step Calibration. Sampler step positions are drawn from
            Normal(mu * steps, sigma * steps) counted from the image (x_0) end, so mu < 1/2 centres the set on
            the late, nearly clean steps whose errors survive into the final image. Each x_t comes from the
            full-precision model's own sampler, started from pure noise.
        'ndtc_code': the same draw counted from the noise end, which is what the authors' released code does
            (it indexes the progressive sampling loop from x_T), so there the mean sits on the noise side.
            Unlike that code, each x_t is paired with the time-step the sampler really feeds with it (the
            code pairs the loop index, scaled as a time-step, with the output of that loop step).
        'uniform': positions evenly spaced over the trajectory (Q-Diffusion style), FP sampler.
        'single_step': every sample at one time-step (the classical single-time-step PTQ baseline), FP sampler.
        'real_noised': real images pushed through the forward process q(x_t | x_0) at uniform t; no sampling.
    mu / sigma: fractions of `steps`. Defaults 0.4 / 0.4 are what the authors' NDTC script
        (quant_sample_ddim_in_backward_DNTC.sh: --calib_t_mode_normal_mean 0.4 --calib_t_mode_normal_std 0.4)
        runs with; their argparse defaults are 0.5 / 0.35.
    sampler / steps / eta: the sampler that generates calibration trajectories (DDIM 100 steps by default:
        the service's default sampler, at a cost of at most 100 UNet calls per batch).
    single_step_t: diffusion time-step for 'single_step' (the sampler step nearest to it is used); None = the
        middle of the trajectory.
    seed: drives the time-step draw and every trajectory's noise, so a calibration set is reproducible.
    """

    method: str = "ndtc"
    n_samples: int = 1024
    mu: float = 0.4
    sigma: float = 0.4
    sampler: str = "ddim"
    steps: int = 100
    eta: float = 0.0
    single_step_t: int | None = None
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check_choice(self.method, "method", CALIBRATION_METHODS)
        _check_int(self.n_samples, "n_samples", 1)
        for name, lo, hi in (("mu", 0.0, 1.0), ("sigma", 0.0, float("inf")), ("eta", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma!r}")
        _check_choice(self.sampler, "sampler", SAMPLERS)
        _check_int(self.steps, "steps", 1)
        if self.single_step_t is not None:
            _check_int(self.single_step_t, "single_step_t", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _check_int(self.batch_size, "batch_size", 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PTQ4DMConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(f"quant must be a QuantConfig, got {type(self.quant).__name__}")
        if not isinstance(self.calibration, CalibrationConfig):
            raise ValueError(f"calibration must be a CalibrationConfig, got {type(self.calibration).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {"quant": self.quant.to_dict(), "calibration": self.calibration.to_dict()}

    def for_steps(self, steps: int) -> PTQ4DMConfig:
        """The config a request of `steps` sampler steps runs (QuantConfig.for_steps): what its images depend on."""
        return replace(self, quant=self.quant.for_steps(steps))

    def stable_hash(self) -> str:
        """sha256 of the canonical JSON of every field: equal configs give equal hashes across processes."""
        return _digest(self.to_dict())


# Named starting points for the QuantConfig / CalibrationConfig fields of a quantized precision; explicit
# overrides win over a preset's values. 'ptq4dm' is the paper's method exactly (NDTC, one range per tensor,
# first/last layers at 8 bits) and the library's default; the others are what the measurements in
# docs/SENSITIVITY.md and docs/RESULTS.md chose; the CLI and the service use SERVING_PRESET unless told otherwise.
PRESETS: dict[str, dict[str, object]] = {
    "ptq4dm": {},
    "recommended": {"method": "uniform", "timestep_groups": 4, "keep_first_last_fp": True, "weight_rounding": "gptq"},
    # the noise-end half of the time-steps in full precision: the images stay the FP ones, at a speed cost; requests
    # of more than 100 steps (DDPM-1000's worst seeds) three quarters (t >= 250)
    "faithful": {"method": "uniform", "timestep_groups": 4, "keep_first_last_fp": True, "weight_rounding": "gptq",
                 "float_groups": 2, "float_groups_by_steps": ((101, 3),)},
    # faithful whose noise-end half runs int8 with a residual pass (inputs on a ~16-bit grid) instead of fp32, but
    # for the layers whose 8-bit weights bench/noise_end_layers.py ranks first there (~6% of the built-in UNet's
    # multiply-accumulates); requests of more than 100 steps run faithful's fp32 for t >= 250
    "residual": {"method": "uniform", "timestep_groups": 4, "keep_first_last_fp": True, "weight_rounding": "gptq",
                 "float_groups": 2, "float_group_mode": "residual", "float_groups_by_steps": ((101, 3),),
                 "float_group_layers": ("up_blocks.-1.resnets.*.conv_shortcut", "up_blocks.-1.resnets.*.conv2",
                                        "time_embedding.linear_1")},
    # the noise-end half int8 on its own ranges but for the last up block's resnet outputs, which
    # bench/noise_end_layers.py ranks first there (~6% of the multiply-accumulates of the built-in UNet)
    "balanced": {"method": "uniform", "timestep_groups": 4, "keep_first_last_fp": True, "weight_rounding": "gptq",
                 "float_groups": 2,
                 "float_group_layers": ("up_blocks.-1.resnets.*.conv2", "up_blocks.-1.resnets.*.conv_shortcut")},
}
LIBRARY_PRESET = "ptq4dm"


def parse_precision(precision: str) -> tuple[int, int] | None:
    """'w8a8' -> (8, 8); 'fp32' -> None (no quantization). Bit widths are validated like QuantConfig's."""
    if not isinstance(precision, str):
        raise ValueError(f"precision must be a string like 'w8a8' or 'fp32', got {precision!r}")
    text = precision.strip().lower()
    if text == "fp32":
        return None
    match = _PRECISION_RE.match(text)
    if match is None:
        raise ValueError(f"precision must be 'fp32' or 'w<bits>a<bits>' (e.g. {', '.join(PRECISION_PRESETS)}), "
                         f"got {precision!r}")
    weight_bits, act_bits = int(match.group(1)), int(match.group(2))
    check_bits(weight_bits, WEIGHT_BITS, "weight_bits")
    check_bits(act_bits, ACT_BITS, "act_bits")
    return weight_bits, act_bits


def quant_config_for(precision: str, **overrides: Any) -> QuantConfig | None:
    """QuantConfig for a precision string (None for 'fp32'); other fields from `overrides`."""
    bits = parse_precision(precision)
    if bits is None:
        return None
    return QuantConfig(weight_bits=bits[0], act_bits=bits[1], **overrides)
