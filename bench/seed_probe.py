"""The worst seeds of a quality row, sampled again under other configs and under seeded random error: what
decides them.

Why: a row's worst seed (docs/RESULTS.md) is one image of 2000, and testing a fix on all 2000 costs hours at
DDPM-1000; its few worst seeds cost a minute or two. The stored row's samples (runs/samples, bench/quality.py)
pick the seeds; each `--config` is quantized and run on `--backend` as quality.py runs it, each `--perturb`
adds seeded Gaussian error of relative size REL to the FP noise estimate for t in [LO, HI)
(bench/perturbation.py) and nothing else; every line is PSNR against the committed FP references.

    python bench/seed_probe.py --column ddpm1000 --row "w8a8 faithful fp32 t>=500 only" --worst 6 \\
        --config 'w8a8 {"preset": "faithful", "float_groups": 3}' --perturb 0.01:250:500
    python bench/seed_probe.py --column ddim100 --row "w8a8 residual every layer" --worst 2 \
        --config 'w8a8 {"preset": "residual", "float_group_layers": []}' --config 'w8a8 {"preset": "faithful"}' \
        --mix 0,0,0,1 --mix 0,0,1,0        # residual passes in one noise-end group, fp32 in the other
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perturbation import NoisyUNet  # noqa: E402
from quality import REFERENCES, SAMPLERS, load_uint8_batches, samples_tag, variants  # noqa: E402

from quantizer.diffusion.images import to_uint8  # noqa: E402
from quantizer.diffusion.models import DiffusionModel, load_model  # noqa: E402
from quantizer.diffusion.sampling import sample  # noqa: E402
from quantizer.evaluation.evaluate import cached_images, samples_cache_dir  # noqa: E402
from quantizer.evaluation.metrics import capped_psnr  # noqa: E402
from quantizer.execution.executor import build_executor  # noqa: E402
from quantizer.ptq.pipeline import quantize_model  # noqa: E402
from quantizer.ptq.timestep_groups import TimestepGroupedUNet  # noqa: E402


def per_seed_psnr(references: dict[int, np.ndarray], images: dict[int, torch.Tensor]) -> dict[int, float]:
    """PSNR (dB, capped as quality.py's rows are) of every seed both hold."""
    seeds = sorted(set(references) & set(images))
    if not seeds:
        raise ValueError("the row's samples and the references share no seed: was the row run?")
    values = capped_psnr(np.stack([references[s] for s in seeds]),
                         to_uint8(torch.stack([images[s] for s in seeds])))
    return dict(zip(seeds, (float(v) for v in values), strict=True))


def worst_seeds(psnrs: dict[int, float], k: int) -> list[int]:
    return sorted(psnrs, key=lambda seed: (psnrs[seed], seed))[:k]


def parse_perturbation(spec: str) -> tuple[float, tuple[int, int]]:
    """'REL:LO:HI' -> (REL, (LO, HI)); a ValueError naming the option otherwise."""
    try:
        rel, lo, hi = spec.split(":")
        return float(rel), (int(lo), int(hi))
    except ValueError as error:
        raise ValueError(f"--perturb wants REL:LO:HI (e.g. 0.01:250:500), got {spec!r}") from error


def parse_config(spec: str) -> tuple[str, dict]:
    """'PRECISION JSON' -> (precision, overrides), e.g. 'w8a8 {"preset": "faithful"}'."""
    precision, _, overrides = spec.partition(" ")
    try:
        parsed = json.loads(overrides or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"--config wants 'PRECISION JSON', got {spec!r}: {error}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"--config's JSON must be an object, got {spec!r}")
    return precision, parsed


def parse_mix(spec: str, n_configs: int) -> list[int]:
    """'0,0,0,1' -> [0, 0, 0, 1]: a --config index per time-step group; a ValueError naming the option otherwise."""
    try:
        mix = [int(i) for i in spec.split(",")]
    except ValueError:
        raise ValueError(f"--mix wants a comma list of --config indices, got {spec!r}") from None
    if bad := [i for i in mix if not 0 <= i < n_configs]:
        raise ValueError(f"--mix {spec!r}: indices {bad} name no --config (there are {n_configs})")
    return mix


def mixed_groups(units: Sequence[nn.Module], mix: Sequence[int]) -> TimestepGroupedUNet:
    """A UNet whose group g runs as units[mix[g]]'s group g does (each a time-step-grouped UNet, as a request of
    the probed step count runs it): which group's error decides a seed, without a config for every mix."""
    used = {i: units[i] for i in mix}
    if bad := [i for i, unet in used.items() if not isinstance(unet, TimestepGroupedUNet)]:
        raise ValueError(f"--mix: configs {bad} are not time-step-grouped (no timestep_groups)")
    edges = {tuple(unet.edges) for unet in used.values()}  # type: ignore[union-attr]
    if len(edges) != 1 or len(next(iter(edges))) != len(mix):
        raise ValueError(f"--mix {list(mix)}: its configs' time-step groups {sorted(edges)} are not {len(mix)} "
                         "shared groups")
    return TimestepGroupedUNet([units[i].members[g] for g, i in enumerate(mix)],  # type: ignore[union-attr]
                               next(iter(edges))).eval()


def probe(unet: nn.Module, model: DiffusionModel, sampler: str, steps: int, seeds: Sequence[int],
          references: dict[int, np.ndarray]) -> list[float]:
    """PSNR of each seed sampled with `unet` (one batch) against its reference."""
    x = sample(unet, model.scheduler_config, list(seeds), sampler, steps, batch_size=len(seeds))
    images = dict(zip(seeds, x, strict=True))
    psnrs = per_seed_psnr(references, images)
    return [psnrs[s] for s in seeds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--column", default="ddpm1000", choices=list(SAMPLERS))
    parser.add_argument("--row", default="w8a8 faithful", help="a bench/quality.py variant label")
    parser.add_argument("--backend", default="openvino", help="the row's backend; the configs run on it too")
    parser.add_argument("--worst", type=int, default=6, help="how many of the row's worst seeds to probe")
    parser.add_argument("--seeds", default="", help="comma list of seeds probed besides the worst")
    parser.add_argument("--config", action="append", default=[], help="'PRECISION JSON', repeatable")
    parser.add_argument("--perturb", action="append", default=[], help="REL:LO:HI, repeatable")
    parser.add_argument("--mix", action="append", default=[],
                        help="comma list of --config indices (from 0), one per time-step group: a UNet running each "
                             "group as that config does, e.g. 0,0,0,1; repeatable")
    parser.add_argument("--model", default=None, help="model dir (default: the built-in model)")
    parser.add_argument("--samples-dir", default="runs/samples")
    parser.add_argument("--references-dir", default=str(REFERENCES))
    parser.add_argument("--cache-dir", default="runs/calibration-cache")
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(spec) for spec in args.config]
        perturbations = [parse_perturbation(spec) for spec in args.perturb]
        mixes = [parse_mix(spec, len(configs)) for spec in args.mix]
    except ValueError as error:
        parser.error(str(error))
    try:
        extra_seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds wants a comma list of integers, got {args.seeds!r}")
    by_label = {v.label: v for v in variants()}
    if args.row not in by_label:
        parser.error(f"--row {args.row!r} is not a bench/quality.py variant")
    variant, (sampler, steps) = by_label[args.row], SAMPLERS[args.column]
    model = load_model(args.model)
    references = load_uint8_batches(samples_cache_dir(args.references_dir, model, "fp32-uint8", sampler, steps))
    tag = samples_tag(variant, args.backend, sampler, steps)
    stored = cached_images(samples_cache_dir(args.samples_dir, model, tag, sampler, steps))
    row_psnr = per_seed_psnr(references, stored)
    seeds = worst_seeds(row_psnr, args.worst) + extra_seeds
    print(f"Command: `python bench/seed_probe.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"PSNR dB against FP, {args.column}; the row has {len(row_psnr)} seeds stored.\n")
    print("| what | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))

    def line(what: str, values: Sequence[float]) -> None:
        print(f"| {what} | " + " | ".join(f"{v:.1f}" for v in values) + " |", flush=True)

    line(f"{args.row}, {args.backend} (stored row)", [row_psnr[s] for s in seeds])
    units = []
    for precision, overrides in configs:
        quantized = quantize_model(model, precision, overrides, cache_dir=args.cache_dir, progress=False)
        unet = build_executor(quantized.unet, args.backend, max_batch=len(seeds))
        units.append(unet.for_steps(steps) if isinstance(unet, TimestepGroupedUNet) else unet)
        line(f"{precision} `{json.dumps(overrides)}`, {args.backend}",
             probe(units[-1], model, sampler, steps, seeds, references))
    for mix in mixes:
        try:
            unet = mixed_groups(units, mix)
        except ValueError as error:
            parser.error(str(error))
        line(f"groups from configs {','.join(map(str, mix))}, {args.backend}",
             probe(unet, model, sampler, steps, seeds, references))
    for rel, window in perturbations:
        line(f"FP + {rel:g} random error at t in [{window[0]}, {window[1]})",
             probe(NoisyUNet(model.unet, rel, window), model, sampler, steps, seeds, references))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
