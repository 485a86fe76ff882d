"""Quantization options side by side on the built-in model: PSNR of quantized images against the FP ones.

Why: the options beside the paper's method (time-step groups, first/last layers in float, the calibration set)
are chosen by measurement; this is the quick measurement (16 images at DDIM-100 and DDIM-25, seeds 0..15), the
full one being bench/quality.py's N=2000 FD rows. Configs run in one process, so configs sharing a calibration
set build it once; stats go through the calibration cache.

    python bench/presets.py w8a8 '{"preset": "ptq4dm"}' '{"preset": "recommended"}'
    python bench/presets.py w8a8 '{"timestep_groups": 4, "method": "uniform"}' --backend openvino
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.metrics import capped_psnr
from quantizer.execution.executor import build_executor
from quantizer.ptq.pipeline import quantize_model

STEPS = (100, 25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("precision")
    parser.add_argument("configs", nargs="+", help="JSON quantization overrides, one per row")
    parser.add_argument("--backend", default="fake", help="how the quantized UNet runs (default: the simulation)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cache-dir", default="runs/calibration-cache")
    args = parser.parse_args(argv)
    model = load_model(None)
    seeds = list(range(args.images))
    refs = {s: to_uint8(sample(model.unet, model.scheduler_config, seeds, steps=s)) for s in STEPS}
    print(f"Command: `python bench/presets.py {shlex.join(sys.argv[1:])}`\n")
    print(f"| {args.precision} overrides | backend | stats | " + " | ".join(
        f"DDIM-{s} PSNR dB (worst image)" for s in STEPS) + " |")
    print("|---|---|---|" + "---|" * len(STEPS), flush=True)
    for text in args.configs:
        overrides = json.loads(text)
        q = quantize_model(model, args.precision, overrides, cache_dir=args.cache_dir, progress=False)
        unet = q.unet if args.backend == "fake" else build_executor(q.unet, args.backend)
        cells = []
        for s, ref in refs.items():
            per_image = capped_psnr(ref, to_uint8(sample(unet, model.scheduler_config, seeds, steps=s)))
            cells.append(f"{per_image.mean():.1f} ({per_image.min():.1f})")
        print(f"| `{text}` | {args.backend} | {q.stats_source} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
