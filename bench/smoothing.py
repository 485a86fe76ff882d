"""Does per-input-channel smoothing (SmoothQuant-style) lower the int8 error at the noise end?

Why: at t >= 500 the int8 graphs' one-forward error is almost all activation rounding (`bench/noise_end_layers.py
--steps 0`). If a few input channels set each layer's per-tensor range, migrating their scale into the weights
(x / s and W * s, s_c = max|x_c|^alpha / max|W_c|^(1 - alpha)) gives the other channels a finer grid at no cost on
the int8 kernels (s folds into the previous layer or the quantize node). This measures how much it buys, before
anyone builds it into the quantizer.

For each float group of the preset (as bench/noise_end_layers.py: that group's all-int8 UNet on its own ranges),
every quantized Conv2d/Linear is replaced by its smoothed twin: s from the group's own calibration samples (the
preset's calibration set, cut at the group edges), the weights W * s on their per-output-channel grid (the
preset's search, nearest rounding), the input x / s on a per-tensor range searched like PTQ4DM's (same metric and
candidates; a split concat input keeps one range per half). Then the same one-forward error on the same held-out
pairs as bench/noise_end_layers.py, for each alpha, next to the group's plain int8 error.

    python bench/smoothing.py                         # W8A8 `faithful`, alpha 0.3 / 0.5 / 0.7, ~5 min
    python bench/smoothing.py --alphas 0.5 --pairs 512
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_end_layers import LayerSwitch, noise_end, noise_end_parser, rel_error  # noqa: E402  (same setup)
from sensitivity import eps  # noqa: E402

from quantizer.diffusion.models import DiffusionModel, load_model  # noqa: E402
from quantizer.ptq.calibration import CalibrationSet, build_calibration_set  # noqa: E402
from quantizer.ptq.config import QuantConfig  # noqa: E402
from quantizer.ptq.fake_quant import act_range, channel_view, fake_quantize, weight_range  # noqa: E402
from quantizer.ptq.pipeline import build_config  # noqa: E402
from quantizer.ptq.quant_modules import QuantLayer, SplitActQuantizer  # noqa: E402
from quantizer.ptq.scale_search import search_act_qparams, search_weight_scale  # noqa: E402
from quantizer.ptq.timestep_groups import split_calibration  # noqa: E402

ROWS_PER_BATCH = 512  # input rows (one value per channel) kept per layer and calibration batch for the search
MIN_SMOOTH = 1e-5


def channels_last(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """A layer input as rows of its input channels: (N, C, H, W) -> (N*H*W, C); (..., C) -> (-1, C)."""
    return (x.movedim(1, -1) if conv else x).reshape(-1, x.shape[1] if conv else x.shape[-1]).float()


class InputStats:
    """Per-input-channel extremes of one layer's input over the calibration run, and a seeded sample of rows."""

    def __init__(self, conv: bool, seed: int) -> None:
        self.conv, self.rows = conv, []
        self.generator = torch.Generator().manual_seed(seed)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = channels_last(x.detach(), self.conv)
        lo, hi = rows.amin(0), rows.amax(0)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        pick = torch.randint(0, rows.shape[0], (min(ROWS_PER_BATCH, rows.shape[0]),), generator=self.generator)
        self.rows.append(rows[pick])


class SmoothedLayer(nn.Module):
    """conv/linear(q_a(x / s), q_w(W * s)): the layer's output with its input scale s_c moved into the weights.

    segments: the per-tensor input ranges, (first channel, end, scale, zero point); two for a split concat.
    """

    def __init__(self, layer: nn.Module, smooth: torch.Tensor, qweight: torch.Tensor,
                 segments: list[tuple[int, int, torch.Tensor, torch.Tensor]], act_bits: int) -> None:
        super().__init__()
        self.layer, self.conv = layer, isinstance(layer, nn.Conv2d)
        self.register_buffer("smooth", smooth)
        self.register_buffer("qweight", qweight)
        self.segments, self.qrange = segments, act_range(act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / (self.smooth.reshape(1, -1, 1, 1) if self.conv else self.smooth)
        parts = [fake_quantize(x[:, a:b] if self.conv else x[..., a:b], scale, zero_point, self.qrange)
                 for a, b, scale, zero_point in self.segments]
        x = torch.cat(parts, dim=1 if self.conv else -1)
        if self.conv:
            return self.layer._conv_forward(x, self.qweight, self.layer.bias)
        return nn.functional.linear(x, self.qweight, self.layer.bias)


def smoothing_factors(stats: InputStats, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_c = max|x_c|^alpha / max|W_c|^(1 - alpha) over input channel c (SmoothQuant's migration strength alpha)."""
    x_max = torch.maximum(stats.lo.abs(), stats.hi.abs()).clamp_min(MIN_SMOOTH)
    w_max = weight.detach().float().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(1).clamp_min(MIN_SMOOTH)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(MIN_SMOOTH)


def smoothed_layer(quantized: QuantLayer, layer: nn.Module, stats: InputStats, alpha: float,
                   quant: QuantConfig) -> SmoothedLayer:
    """The smoothed twin of one quantized layer: the preset's weight search on W * s, its range search on x / s."""
    smooth = smoothing_factors(stats, layer.weight, alpha)
    weight = layer.weight.detach().float() * smooth.reshape(1, -1, *([1] * (layer.weight.ndim - 2)))
    bits = int(quantized.weight_quantizer.bits)
    scale = search_weight_scale(weight, bits, quant.metric, quant.p, quant.n_candidates, quant.search)
    qweight = fake_quantize(weight, channel_view(scale, weight.ndim), 0, weight_range(bits))
    rows = torch.cat(stats.rows) / smooth
    lo, hi = stats.lo / smooth, stats.hi / smooth
    split = quantized.input_quantizer
    cuts = [0, int(split.split), rows.shape[1]] if isinstance(split, SplitActQuantizer) else [0, rows.shape[1]]
    act_bits = int(quantized.input_quantizer.bits)
    segments = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        scale_a, zero_point = search_act_qparams(rows[:, a:b], act_bits, quant.metric, quant.p, quant.n_candidates,
                                                 quant.search, float(lo[a:b].min()), float(hi[a:b].max()),
                                                 quant.act_symmetric)
        segments.append((a, b, scale_a, zero_point))
    return SmoothedLayer(layer, smooth, qweight.to(layer.weight.dtype), segments, act_bits)


@torch.no_grad()
def input_stats(float_unet: nn.Module, names: list[str], part: CalibrationSet) -> dict[str, InputStats]:
    """Each named layer's input statistics over the float UNet's forwards on one group's calibration samples."""
    stats = {n: InputStats(isinstance(float_unet.get_submodule(n), nn.Conv2d), seed=i) for i, n in enumerate(names)}
    hooks = [float_unet.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, s=stats[n]: s.update(args[0])) for n in names]
    try:
        for xs, ts, extra in part.inputs():
            float_unet(xs, ts, **extra)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


@torch.no_grad()
def run(model: DiffusionModel, precision: str, config: dict[str, Any], alphas: list[float], n_pairs: int,
        cache_dir: str | None) -> dict[str, Any]:
    end = noise_end(model, precision, config, n_pairs, cache_dir)
    calibration = build_calibration_set(model.unet, model.scheduler_config, build_config(precision, config).calibration,
                                        progress=False)
    parts = split_calibration(calibration, end.q.unet.edges)
    groups = {}
    for g in end.float_groups:
        member, held_out = end.q.unet.members[g], end.held_out[g]
        switch = LayerSwitch(member, model.unet)
        stats = input_stats(model.unet, list(switch.quantized), parts[g])
        ref = eps(model.unet, held_out)
        row: dict[str, Any] = {"calibration_samples": len(parts[g]), "pairs": len(held_out),
                               "int8": rel_error(member, held_out, ref, end.num_train), "alphas": {}}
        for alpha in alphas:
            switch.use({name: smoothed_layer(layer, switch.floats[name], stats[name], alpha, end.quant)
                        for name, layer in switch.quantized.items()})
            row["alphas"][str(alpha)] = rel_error(member, held_out, ref, end.num_train)
        switch.use({})
        groups[end.span(g)] = row
        print(f"group [{end.span(g).replace('-', ', ')}): {row}", file=sys.stderr, flush=True)
    return {"precision": precision, "config": config, "calibration_hash": end.q.calibration_hash,
            "stats_source": end.q.stats_source, "groups": groups}


def report(result: dict[str, Any], command: str) -> str:
    alphas = list(next(iter(result["groups"].values()))["alphas"])
    lines = [f"Command: `{command}`. {result['precision'].upper()} `{json.dumps(result['config'])}` (stats: "
             f"{result['stats_source']}, {result['calibration_hash'][:12]}), fake quant, one-forward relative "
             "error on held-out pairs.", "",
             "| group | calibration samples | held-out pairs | int8 | " + " | ".join(f"smoothed, alpha {a}"
                                                                         for a in alphas) + " |",
             "|---|---|---|---|" + "---|" * len(alphas)]
    for span, row in result["groups"].items():
        lines.append(f"| [{span.replace('-', ', ')}) | {row['calibration_samples']} | {row['pairs']} | "
                     f"{row['int8']:.5f} | " + " | ".join(f"{row['alphas'][a]:.5f}" for a in alphas) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = noise_end_parser(__doc__)
    parser.add_argument("--alphas", default="0.3,0.5,0.7", help="comma-separated migration strengths")
    args = parser.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if any(not 0 <= a <= 1 for a in alphas):
        raise SystemExit(f"--alphas must lie in [0, 1], got {args.alphas}")
    torch.manual_seed(0)
    result = run(load_model(args.model), args.precision, {"preset": args.preset}, alphas, args.pairs, args.cache_dir)
    print(report(result, shlex.join(["python", "bench/smoothing.py", *(argv or sys.argv[1:])])))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
