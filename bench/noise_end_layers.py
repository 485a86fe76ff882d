"""Which layers the noise end needs in float: a greedy ranking on the float groups of a time-step-grouped preset.

Why: `faithful` runs its noise-end time-step groups in fp32 (a deterministic sampler decides there what the image
shows, docs/RESULTS.md), which makes its forward ~25% slower than the int8 graphs at batch 16. If the int8 error of
those groups sits in a few layers, floating just those keeps most of the accuracy at most of the int8 speed
(QuantConfig.float_group_layers). This measures where it sits.

For each float group of the preset (its activation ranges are calibrated even though the preset does not run
them), starting from that group's all-int8 UNet, it keeps in float (full-precision input and weights, the model's
own layer) the layer whose float copy lowers the one-forward error most, and repeats. One-forward error: mean
||eps_q - eps_fp|| / ||eps_fp|| over the held-out (x_t, t) pairs of bench/sensitivity.py that fall in the group;
MAC share: the float layers' share of one forward's multiply-accumulates.

    python bench/noise_end_layers.py --steps 6 --out runs/noise-end-layers.md     # W8A8 `faithful`, ~10 min
    python bench/noise_end_layers.py --preset residual --steps 4   # on the residual passes (float_group_mode)
    python bench/noise_end_layers.py --steps 0     # each group's int8 error, and with only the weights quantized
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sensitivity import HELD_OUT_SEED, _flops_share, eps, one_forward_errors  # noqa: E402  (its held-out pairs)

from quantizer.diffusion.models import DiffusionModel, load_model  # noqa: E402
from quantizer.ptq.calibration import CalibrationSet, build_calibration_set  # noqa: E402
from quantizer.ptq.config import CalibrationConfig, QuantConfig  # noqa: E402
from quantizer.ptq.pipeline import QuantizedModel, build_config, quantize_model  # noqa: E402
from quantizer.ptq.quant_modules import ActQuantizer, QuantLayer, run_residual  # noqa: E402
from quantizer.ptq.timestep_groups import split_calibration  # noqa: E402


class LayerSwitch:
    """Puts other layers (the model's own float ones, or variants of the quantized ones) in place of chosen
    quantized layers of a UNet, and back."""

    def __init__(self, unet: nn.Module, float_unet: nn.Module) -> None:
        self.unet = unet
        self.quantized = {n: m for n, m in unet.named_modules() if isinstance(m, QuantLayer)}
        self.floats = {n: float_unet.get_submodule(n) for n in self.quantized}

    def use(self, replacements: Mapping[str, nn.Module]) -> None:
        """These layers in place of the quantized ones they name; every other quantized layer back as it was."""
        for name, module in self.quantized.items():
            self.unet.set_submodule(name, replacements.get(name, module))

    def set_float(self, names: set[str]) -> None:
        self.use({name: self.floats[name] for name in names})


def rel_error(unet: nn.Module, pairs: CalibrationSet, ref: torch.Tensor, num_train: int) -> float:
    """bench/sensitivity.py's one-forward error of unet on these pairs (mean over pairs)."""
    return one_forward_errors(eps(unet, pairs), ref, pairs.ts, num_train)["rel_error"]


def weights_only_error(unet: nn.Module, pairs: CalibrationSet, ref: torch.Tensor, num_train: int) -> float:
    """The error with every layer input left in float (only the weights on their grids): how much of the group's
    error the weights carry, against the activation rounding."""
    quantizers = [m for m in unet.modules() if isinstance(m, ActQuantizer)]
    modes = [q.mode for q in quantizers]
    for q in quantizers:
        q.mode = "fp"
    try:
        return rel_error(unet, pairs, ref, num_train)
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.mode = mode


def greedy(switch: LayerSwitch, pairs: CalibrationSet, ref: torch.Tensor, num_train: int, steps: int,
           macs: dict[str, float]) -> dict[str, Any]:
    """The all-int8 error, then after each step the layer floated, the error and the float layers' MAC share."""
    floated: set[str] = set()
    switch.set_float(floated)
    row: dict[str, Any] = {"pairs": len(pairs), "int8": rel_error(switch.unet, pairs, ref, num_train),
                           "weights_only": weights_only_error(switch.unet, pairs, ref, num_train), "steps": []}
    for _ in range(min(steps, len(switch.quantized))):
        scores = {}
        for name in switch.quantized:
            if name not in floated:
                switch.set_float(floated | {name})
                scores[name] = rel_error(switch.unet, pairs, ref, num_train)
        best = min(scores, key=scores.__getitem__)
        floated.add(best)
        row["steps"].append({"layer": best, "rel_error": scores[best],
                             "mac_share": sum(macs.get(n, 0.0) for n in floated)})
        print(f"  + {best}: {scores[best]:.5f}", file=sys.stderr, flush=True)
    switch.set_float(set())
    return row


@dataclass
class NoiseEnd:
    """A preset's noise-end groups to measure on: its statistics with every group quantized (the float groups' int8
    UNets, on their own ranges), the held-out pairs cut at the group edges, and which groups are the float ones."""

    quant: QuantConfig
    q: QuantizedModel
    held_out: list[CalibrationSet]
    edges: list[int]  # the group edges, then num_train
    num_train: int

    @property
    def float_groups(self) -> range:
        return range(len(self.held_out) - self.quant.float_groups, len(self.held_out))

    def span(self, g: int) -> str:
        return f"{self.edges[g]}-{self.edges[g + 1]}"


def noise_end(model: DiffusionModel, precision: str, config: dict[str, Any], n_pairs: int,
              cache_dir: str | None) -> NoiseEnd:
    """config: the quantization overrides (a preset and/or fields) whose float groups are measured."""
    quant = build_config(precision, config).quant
    if not quant.float_groups:
        raise ValueError(f"{config} has no float groups to measure")
    q = quantize_model(model, precision, {**config, "float_groups": 0, "float_group_layers": [],
                                          "float_group_mode": "fp32", "float_groups_by_steps": []},
                       cache_dir=cache_dir, progress=False)
    pairs = build_calibration_set(model.unet, model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=n_pairs, seed=HELD_OUT_SEED,
                                                    batch_size=64), progress=False)
    num_train = int(model.scheduler_config["num_train_timesteps"])
    return NoiseEnd(quant, q, split_calibration(pairs, q.unet.edges), [*q.unet.edges, num_train], num_train)


def run(model: DiffusionModel, precision: str, config: dict[str, Any], n_pairs: int, steps: int,
        cache_dir: str | None) -> dict[str, Any]:
    """config: the quantization overrides (a preset and/or fields) whose float groups are ranked."""
    end = noise_end(model, precision, config, n_pairs, cache_dir)
    residual = end.quant.float_group_mode == "residual"
    macs = _flops_share(model)
    groups = {}
    for g in end.float_groups:
        part = end.held_out[g]
        ref = eps(model.unet, part)
        print(f"group [{end.span(g).replace('-', ', ')}): {len(part)} pairs", file=sys.stderr, flush=True)
        # a residual preset's groups run every int8 layer with its residual pass: rank on those members
        member = run_residual(end.q.unet.members[g]) if residual else end.q.unet.members[g]
        groups[end.span(g)] = greedy(LayerSwitch(member, model.unet), part, ref, end.num_train, steps, macs)
    return {"precision": precision, "config": config, "calibration_hash": end.q.calibration_hash,
            "stats_source": end.q.stats_source, "residual": residual, "groups": groups}


def report(result: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`. {result['precision'].upper()} `{json.dumps(result['config'])}` (stats: "
             f"{result['stats_source']}, {result['calibration_hash'][:12]}), fake quant"
             + (", every int8 layer with its residual pass." if result.get("residual") else "."), ""]
    for span, row in result["groups"].items():
        lines += [f"Group t in [{span.replace('-', ', ')}) ({row['pairs']} held-out pairs): all int8"
                  f"{' + residual' if result.get('residual') else ''} "
                  f"{row['int8']:.5f}"
                  + (f", only the weights on their grid {row['weights_only']:.5f}" if "weights_only" in row else ""),
                  ""]
        if row["steps"]:
            lines += ["| + float layer | rel. error | float MAC share |", "|---|---|---|"]
            lines += [f"| `{s['layer']}` | {s['rel_error']:.5f} | {100 * s['mac_share']:.1f}% |"
                      for s in row["steps"]]
        lines.append("")
    return "\n".join(lines)


def noise_end_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every noise-end measurement takes: which model, precision and preset, how many held-out pairs,
    where the calibration cache is, and a JSON copy of the result."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="built-in name or a diffusers directory (default: built-in)")
    parser.add_argument("--precision", default="w8a8")
    parser.add_argument("--preset", default="faithful")
    parser.add_argument("--pairs", type=int, default=256, help="held-out pairs over all time-steps")
    parser.add_argument("--cache-dir", default="runs/calibration-cache")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = noise_end_parser(__doc__)
    parser.add_argument("--float-groups", type=int, default=None,
                        help="rank this many groups from the noise end instead of the preset's float groups")
    parser.add_argument("--steps", type=int, default=8, help="layers to add, per group (0: the all-int8 errors)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config: dict[str, Any] = {"preset": args.preset}
    if args.float_groups is not None:
        config["float_groups"] = args.float_groups
    result = run(load_model(args.model), args.precision, config, args.pairs, args.steps, args.cache_dir)
    text = report(result, shlex.join(["python", "bench/noise_end_layers.py", *(argv or sys.argv[1:])]))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
