"""Would a 16-bit float path at the noise end keep the images? The FP UNet with every Conv2d/Linear computed from
fp16 or bf16 inputs and weights (products summed in fp32), or from split bf16 ones (bf16x3), for t in a window,
fp32 elsewhere, against the committed FP references of the same seeds.

Why: the quantization issue's speed target fails because `faithful` runs the noise-end half of the time-steps in
fp32 (docs/RESULTS.md); int8 with a residual pass there (0.02-0.04% error) still turned one of 2000 DDIM-100 seeds
into another image. This CPU has no fp16 kernels (OpenVINO lists BF16, FP32, INT8), so the formats are simulated:
each layer's input and weight are rounded to the format, as AMX/AVX512-FP16/BF16 kernels and GPU tensor cores
read them, and the sum stays fp32. GroupNorm, SiLU, softmax and the adds stay fp32 there, the most a 16-bit path
could keep; `--every-output` also stores every parameter and leaf module's output in the format (a graph run
wholly in it, but for the adds and attention's inner products). bf16 is here to compare with what the real bf16
kernels did (docs/RESULTS.md: `openvino-int8-bf16`).

    python bench/float_formats.py --steps 25 --n 2000                   # fp16 and bf16 at t >= 500, DDIM-25
    python bench/float_formats.py --steps 100 --n 500 --formats fp16 --windows 500:1000,250:1000
    python bench/float_formats.py --steps 25 --n 500 --formats fp16 --every-output
    python bench/float_formats.py --steps 100 --seeds 502,209,1677 --control 0   # seeds int8 rows flipped
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import REFERENCES, load_uint8_batches  # noqa: E402

from quantizer.diffusion.images import to_uint8  # noqa: E402
from quantizer.diffusion.models import load_model  # noqa: E402
from quantizer.diffusion.sampling import sample  # noqa: E402
from quantizer.evaluation.evaluate import samples_cache_dir  # noqa: E402
from quantizer.evaluation.metrics import capped_psnr  # noqa: E402

FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SPLIT_FORMATS = {"bf16x3": torch.bfloat16}  # hi + lo parts, three products: what split-bf16 GEMMs compute


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to the nearest value of `dtype` (round to nearest even), kept in fp32."""
    return x.to(dtype).to(torch.float32)


def split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x as hi + lo, each a `dtype` value: hi its rounding, lo the rounding of what hi missed."""
    hi = round_to(x, dtype)
    return hi, round_to(x - hi, dtype)


def split_product(module: nn.Conv2d | nn.Linear, dtype: torch.dtype) -> None:
    """Make `module` compute x_hi*W_hi + x_hi*W_lo + x_lo*W_hi (the lo*lo product dropped), summed in fp32: a
    16-bit-mantissa product from three `dtype` ones, as bf16x3 GEMMs on bf16 matrix units do."""
    w_hi, w_lo = split(module.weight.data, dtype)

    def product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            return module._conv_forward(x, w, bias)
        return nn.functional.linear(x, w, bias)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x_hi, x_lo = split(x, dtype)
        return product(x_hi, w_hi, module.bias) + product(x_hi, w_lo, None) + product(x_lo, w_hi, None)

    module.forward = forward  # type: ignore[method-assign]


def rounded_copy(unet: nn.Module, fmt: str, every_output: bool = False) -> nn.Module:
    """A copy of `unet` whose Conv2d/Linear weights are rounded to format `fmt` and whose inputs are rounded on
    entry (a split format: each layer computes its three-product sum instead).
    every_output: also every parameter and every leaf module's output (GroupNorm, SiLU, ...), as a graph that
    stores each activation in the format would; the adds and attention's inner products still stay fp32."""
    if fmt in SPLIT_FORMATS and every_output:
        raise ValueError(f"--every-output: {fmt} is a product of split operands, not a storage format")
    dtype = SPLIT_FORMATS.get(fmt) or FORMATS[fmt]
    low = copy.deepcopy(unet)
    for module in low.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and fmt in SPLIT_FORMATS:
            split_product(module, dtype)
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(lambda _, args: (round_to(args[0], dtype), *args[1:]))
        if isinstance(module, (nn.Conv2d, nn.Linear)) or every_output:
            for param in module.parameters(recurse=False):
                param.data = round_to(param.data, dtype)
        if every_output and not any(module.children()):
            module.register_forward_hook(lambda _, __, out: round_to(out, dtype))
    return low


class WindowedFormatUNet(nn.Module):
    """The FP UNet, computed by its copy in format `fmt` (rounded_copy) for t in [lo, hi)."""

    def __init__(self, unet: nn.Module, fmt: str, window: tuple[int, int], every_output: bool = False) -> None:
        super().__init__()
        self.unet, self.low, self.window = unet, rounded_copy(unet, fmt, every_output), window
        self.config, self.device, self.dtype = unet.config, torch.device("cpu"), torch.float32

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> UNet2DOutput:
        inside = self.window[0] <= int(t) < self.window[1]
        return UNet2DOutput(sample=(self.low if inside else self.unet)(x, t, **kwargs).sample)


def parse_window(spec: str) -> tuple[int, int]:
    """'LO:HI' -> (LO, HI); a ValueError naming the option otherwise."""
    try:
        lo, hi = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"--windows wants LO:HI pairs (e.g. 500:1000), got {spec!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"--windows: {spec!r} is not 0 <= LO < HI")
    return lo, hi


def psnrs(unet: nn.Module, scheduler_config: dict, steps: int, seeds: Sequence[int], references: dict,
          batch: int) -> np.ndarray:
    """Per-seed PSNR (dB, capped at 100 as quality.py's rows are) against the references, sampled in batches."""
    out = []
    for start in range(0, len(seeds), batch):
        chunk = list(seeds[start:start + batch])
        x = sample(unet, scheduler_config, chunk, "ddim", steps, batch_size=len(chunk))
        out.append(capped_psnr(np.stack([references[s] for s in chunk]), to_uint8(x)))
    return np.concatenate(out)


def forward_errors(unet: nn.Module, scheduler_config: dict, formats: Sequence[str], seeds: Sequence[int],
                   every_output: bool) -> None:
    """One forward's error in each format, ||eps_fmt - eps_fp|| / ||eps_fp||, on the x_t of the seeds' FP DDIM-20
    trajectories at t = 200, 400, 600, 800: the size of the error a format puts into the sampler."""
    xs: dict[int, torch.Tensor] = {}
    sample(unet, scheduler_config, list(seeds), "ddim", 20,
           callback=lambda i, n, t, x: xs.setdefault(int(t), x.clone()))
    lows = {fmt: WindowedFormatUNet(unet, fmt, (0, 1000), every_output) for fmt in formats}
    print(f"One-forward error on the FP DDIM-20 trajectories of seeds {', '.join(map(str, seeds))}:\n")
    print("| t | " + " | ".join(formats) + " |\n|---|" + "---|" * len(formats))
    with torch.no_grad():
        for t in (200, 400, 600, 800):
            x, step = xs[t], torch.tensor(t)
            fp = unet(x, step).sample
            errors = [(lows[fmt](x, step).sample - fp).norm() / fp.norm() for fmt in formats]
            print(f"| {t} | " + " | ".join(f"{100 * float(e):.4f}%" for e in errors) + " |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (the references hold 25 and 100)")
    parser.add_argument("--n", type=int, default=2000, help="seeds 0..n-1")
    parser.add_argument("--seeds", default="", help="comma list of seeds instead (e.g. the ones a row flipped)")
    parser.add_argument("--formats", default="fp16,bf16")
    parser.add_argument("--windows", default="500:1000", help="comma list of LO:HI time-step windows")
    parser.add_argument("--control", type=int, default=64,
                        help="seeds of an all-fp32 run first: the harness reproduces the references")
    parser.add_argument("--batch", type=int, default=125)
    parser.add_argument("--every-output", action="store_true",
                        help="also round every parameter and leaf module output (activations stored in the format)")
    parser.add_argument("--forward-errors", action="store_true",
                        help="first each format's one-forward error on four seeds' FP trajectories")
    parser.add_argument("--model", default=None, help="model dir (default: the built-in model)")
    parser.add_argument("--references-dir", default=str(REFERENCES))
    args = parser.parse_args(argv)
    try:
        windows = [parse_window(spec) for spec in args.windows.split(",")]
    except ValueError as error:
        parser.error(str(error))
    formats = args.formats.split(",")
    if bad := [f for f in formats if f not in FORMATS and f not in SPLIT_FORMATS]:
        parser.error(f"--formats: {bad} not among {sorted(FORMATS | SPLIT_FORMATS)}")
    if args.every_output and (split_asked := [f for f in formats if f in SPLIT_FORMATS]):
        parser.error(f"--every-output: {split_asked} are products of split operands, not storage formats")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s] or list(range(args.n))
    except ValueError:
        parser.error(f"--seeds wants a comma list of integers, got {args.seeds!r}")
    model = load_model(args.model)
    references = load_uint8_batches(samples_cache_dir(args.references_dir, model, "fp32-uint8", "ddim", args.steps))
    if missing := [s for s in seeds if s not in references]:
        parser.error(f"no committed DDIM-{args.steps} reference for {len(missing)} seeds (first {missing[0]})")
    print(f"Command: `python bench/float_formats.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    if args.forward_errors:
        forward_errors(model.unet.eval(), model.scheduler_config, formats, seeds[:4], args.every_output)
    print(f"DDIM-{args.steps}, PSNR dB against the committed FP images.\n")
    rounded = "every parameter and layer output" if args.every_output else "Conv/Linear inputs and weights"
    print(f"| {rounded} | time-steps | seeds | mean | 1st percentile | worst (seed) | "
          "below 25 dB | below 20 dB | s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    runs = [("fp32", (0, 0), seeds[:args.control])] if args.control else []  # an empty window: FP throughout
    runs += [(f, w, seeds) for f in formats for w in windows]
    per_seed: list[tuple[str, dict[int, float]]] = []
    for name, window, run_seeds in runs:
        start = time.perf_counter()
        unet = WindowedFormatUNet(model.unet.eval(), name, window, args.every_output)
        values = psnrs(unet, model.scheduler_config, args.steps, run_seeds, references, args.batch)
        where = "none (control)" if name == "fp32" else f"{window[0]} <= t < {window[1]}"
        worst = int(np.argmin(values))
        print(f"| {name} | {where} | {len(run_seeds)} | {values.mean():.1f} | {np.percentile(values, 1):.1f} | "
              f"{values[worst]:.1f} ({run_seeds[worst]}) | {int((values < 25).sum())} | {int((values < 20).sum())} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
        per_seed.append((f"{name}, {where}", dict(zip(run_seeds, values.tolist(), strict=True))))
    if args.seeds:  # seeds chosen by name: each one's PSNR
        print("\n| run | " + " | ".join(f"seed {s}" for s in seeds) + " |\n|---|" + "---|" * len(seeds))
        for what, values in per_seed:
            print(f"| {what} | " + " | ".join(f"{values[s]:.1f}" if s in values else "" for s in seeds) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
