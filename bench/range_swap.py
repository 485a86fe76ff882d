"""Where does one calibration set beat another? Swap its activation ranges into the other's model, part by part.

Both W8A8 models quantize the weights identically (weight scales do not depend on calibration), so any
difference between two calibration methods is in the per-tensor activation ranges. This takes the ranges of
`--source` for one group of layers at a time, puts them into the `--target` model, and reports each hybrid's
mean PSNR against the FP images of the same seeds (cached fp32 samples of the quality report, or sampled here).
Before that it prints what the ranges are: the FP trajectories' largest x_t (conv_in's input) and, for every layer
whose clipping range differs by more than 1.5x in width between two of `--compare`'s methods, each method's range.

    python bench/range_swap.py --source real_noised --target ndtc --n 128
"""

from __future__ import annotations

import argparse

import torch

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.data import fashion_mnist_tensor
from quantizer.evaluation.evaluate import generate_in_batches, samples_cache_dir
from quantizer.evaluation.metrics import mean_psnr
from quantizer.execution.executor import build_executor
from quantizer.ptq.pipeline import quantize_model
from quantizer.ptq.quant_modules import ActQuantizer

PARTS = {  # label -> module-name prefixes whose input ranges are swapped
    "none": (),
    "conv_in": ("conv_in",),
    "time_embedding": ("time_embedding",),
    "down_blocks": ("down_blocks",),
    "mid_block + conv_out": ("mid_block", "conv_out"),
    "up_blocks": ("up_blocks",),
    "all": ("",),
}


def act_quantizers(unet: torch.nn.Module) -> dict[str, ActQuantizer]:
    return {name: mod for name, mod in unet.named_modules() if isinstance(mod, ActQuantizer)}


def clip_range(quantizer: ActQuantizer) -> tuple[float, float]:
    """The [lo, hi] an activation quantizer represents (asymmetric uint grid)."""
    scale, zero_point = float(quantizer.scale), int(quantizer.zero_point)
    return (quantizer.qrange.qmin - zero_point) * scale, (quantizer.qrange.qmax - zero_point) * scale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="real_noised", help="calibration method whose ranges are swapped in")
    parser.add_argument("--target", default="ndtc", help="calibration method of the model that receives them")
    parser.add_argument("--precision", default="w8a8")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=100, help="sampled and calibrated on")
    parser.add_argument("--n", type=int, default=128, help="images (seeds 0..n-1)")
    parser.add_argument("--compare", default="ndtc,uniform,real_noised", help="methods whose ranges are listed")
    parser.add_argument("--trajectory-n", type=int, default=64, help="FP trajectories scanned for the largest x_t")
    parser.add_argument("--backend", default="int8-x86")
    parser.add_argument("--cache-dir", default="runs/calibration-cache")
    parser.add_argument("--samples-dir", default="runs/samples")
    args = parser.parse_args(argv)

    model = load_model(None)
    real = fashion_mnist_tensor("train")[0]
    seeds = list(range(args.n))
    cal = {"sampler": args.sampler, "steps": args.steps}

    def quantized(method: str) -> torch.nn.Module:
        return quantize_model(model, args.precision, {**cal, "method": method}, cache_dir=args.cache_dir,
                              real_images=real, progress=False).unet

    reference = generate_in_batches(model.unet, model.scheduler_config, seeds, args.sampler, args.steps, 250,
                                    cache_dir=samples_cache_dir(args.samples_dir, model, "fp32", args.sampler,
                                                                args.steps), forward_batch=64)
    peak: list[tuple[float, int]] = []
    sample(model.unet, model.scheduler_config, seeds[:args.trajectory_n], args.sampler, args.steps,
           callback=lambda i, n, t, x: peak.append((float(x.max()), t)))
    top, at = max(peak)
    print(f"largest x_t over {args.trajectory_n} FP {args.sampler}-{args.steps} trajectories: {top:.2f} at t={at}\n")

    methods = args.compare.split(",")
    ranges = {m: {k: clip_range(q) for k, q in act_quantizers(quantized(m)).items()} for m in methods}
    print("| layer input | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for name in ranges[methods[0]]:
        widths = [hi - lo for lo, hi in (ranges[m][name] for m in methods)]
        if max(widths) > 1.5 * min(widths):
            cells = [f"[{ranges[m][name][0]:.2f}, {ranges[m][name][1]:.2f}]" for m in methods]
            print(f"| {name.removesuffix('.input_quantizer')} | " + " | ".join(cells) + " |")
    print()

    source = act_quantizers(quantized(args.source))
    print(f"| {args.source} ranges swapped into {args.target}, {args.precision}, {args.sampler}-{args.steps}, "
          f"n={args.n} | PSNR vs FP (dB) |\n|---|---|")
    for label, prefixes in PARTS.items():
        unet = quantized(args.target)
        for name, quantizer in act_quantizers(unet).items():
            if any(name.startswith(p) for p in prefixes):
                quantizer.set_qparams(source[name].scale, source[name].zero_point)
        x = generate_in_batches(build_executor(unet, args.backend, max_batch=64), model.scheduler_config, seeds,
                                args.sampler, args.steps, 64)
        print(f"| {label} | {mean_psnr(to_uint8(reference), to_uint8(x)):.2f} |", flush=True)


if __name__ == "__main__":
    main()
