"""Class accuracy and FD of a class-conditional model, full precision vs quantized (W8A8 / W4A8 per preset).

Why: quantization of a class-conditional model can keep FD while losing the label (images of the wrong class
still look like clothes); class accuracy, how often the project classifier agrees with the requested class,
measures that. Seeds 0..N-1 with label seed % 10 (N/10 images per class, the test split's class mix); FD is
against all 10,000 test images, as in `ptq4dm eval-fd`. Samples are kept per batch under --samples-dir, keyed
by weights, calibration and backend, so an interrupted run resumes; calibration goes through --cache-dir.

    python bench/class_conditional.py --n 2000                       # the model card's numbers
    python bench/class_conditional.py --n 100 --precisions fp32      # a quick look
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from quantizer.diffusion.models import load_model
from quantizer.evaluation.class_accuracy import balanced_labels, class_accuracy
from quantizer.evaluation.classifier import load_classifier
from quantizer.evaluation.evaluate import generate_in_batches, reference_stats, samples_cache_dir
from quantizer.evaluation.fd import extract_features, frechet_distance, gaussian_stats
from quantizer.execution.executor import build_executor
from quantizer.ptq.pipeline import build_config, quantize_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/fashion-mnist-ddpm-cond")
    parser.add_argument("--n", type=int, default=2000, help="images per row (seeds 0..n-1, label seed %% classes)")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--precisions", default="fp32,w8a8,w4a8")
    parser.add_argument("--presets", default="faithful,recommended", help="quantization presets, one row each")
    parser.add_argument("--backend", default="auto", help="how quantized UNets run (auto: int8-x86 where it can)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--cache-dir", default="runs/calibration-cache")
    parser.add_argument("--samples-dir", default="runs/samples")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    if model.num_classes is None:
        parser.error(f"{args.model} is not class-conditional")
    classifier = load_classifier()
    mu_ref, sigma_ref = reference_stats(classifier)
    seeds = list(range(args.n))
    labels = balanced_labels(seeds, model.num_classes)
    precisions = args.precisions.split(",")
    variants = [("fp32", None)] if "fp32" in precisions else []
    variants += [(p, preset) for p in precisions if p != "fp32" for preset in args.presets.split(",")]
    print(f"Command: `python bench/class_conditional.py {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("| precision | preset | backend | N | class accuracy | FD | sampling s |\n|---|---|---|---|---|---|---|",
          flush=True)
    rows = []
    for precision, preset in variants:
        quantized = quantize_model(model, precision, {"preset": preset} if preset else None, cache_dir=args.cache_dir)
        unet = build_executor(quantized.unet, args.backend if preset else "eager", max_batch=args.batch_size)
        backend = getattr(unet, "backend", "eager" if preset is None else args.backend)
        # the statistics' key leaves out what only chooses how they run (float_groups: faithful and recommended
        # share statistics), so the samples are keyed by the whole resolved config as well
        config_hash = build_config(precision, {"preset": preset}).stable_hash()[:10] if preset else ""
        key = "fp32" if preset is None else f"{precision}-{quantized.cache_key[:12]}-{config_hash}-{backend}"
        cache = samples_cache_dir(args.samples_dir, model, f"{key}-labels-mod{model.num_classes}", args.sampler,
                                  args.steps)
        start = time.time()
        samples = generate_in_batches(unet, model.scheduler_config, seeds, args.sampler, args.steps, args.batch_size,
                                      cache_dir=cache, class_labels=labels)
        wall = time.time() - start
        acc = class_accuracy(classifier, samples, labels, model.num_classes)
        with torch.no_grad():
            fd = frechet_distance(*gaussian_stats(extract_features(classifier, samples)), mu_ref, sigma_ref)
        row = {"precision": precision, "preset": preset, "backend": backend, "n": args.n, "sampler": args.sampler,
               "steps": args.steps, **acc.as_dict(), "fd": round(fd, 3), "sampling_wall_s": round(wall, 1)}
        rows.append(row)
        print(f"| {precision} | {preset or '-'} | {backend} | {args.n} | {acc.accuracy:.1%} | {fd:.2f} | {wall:.0f} |",
              flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
