"""`ptq4dm` subcommands that belong to the quantizer: generate, train, train-classifier, eval-fd."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

from quantizer.diffusion.sampling import SAMPLERS
from quantizer.execution.executor import BACKENDS
from quantizer.ptq.cache import DEFAULT_CALIBRATION_CACHE_DIR


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# The same variable and default as the service's setting, so `ptq4dm quantize` fills the cache workers read.
DEFAULT_CACHE_DIR = os.environ.get("PTQ4DM_CALIBRATION_CACHE_DIR", DEFAULT_CALIBRATION_CACHE_DIR)


def _calibration_overrides(args: argparse.Namespace) -> dict:
    names = ("preset", "method", "n_samples", "mu", "sigma", "metric")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _load_at_precision(args: argparse.Namespace, model=None):  # noqa: ANN001, ANN202 - DiffusionModel (or Quantized)
    """args.model at args.precision; `model`: the already loaded full-precision model."""
    from quantizer.diffusion.models import load_model
    from quantizer.ptq.pipeline import quantize_model

    model = model or load_model(args.model)
    return quantize_model(model, args.precision, _calibration_overrides(args), cache_dir=args.cache_dir)


def cmd_generate(args: argparse.Namespace) -> int:
    from quantizer.diffusion.images import grid, png_bytes, to_uint8
    from quantizer.diffusion.kinds import resolve_class_labels
    from quantizer.diffusion.models import load_model
    from quantizer.diffusion.prompts import check_text_inputs
    from quantizer.diffusion.sampling import validate_request
    from quantizer.evaluation.evaluate import generate_in_batches

    base = load_model(args.model)
    validate_request(args.sampler, args.steps, args.eta, args.n, base.num_train_timesteps)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    seeds = [seed + k for k in range(args.n)]
    given = None if args.class_label is None else [args.class_label] * args.n
    labels = resolve_class_labels(seeds, given, base.model_kind)  # before calibrating: a bad label exits 2 at once
    check_text_inputs(args.prompt, args.negative_prompt, args.guidance_scale, base.model_kind)
    out = Path(args.out)
    if base.model_kind.takes_prompt:
        images = _generate_from_text(args, base, seeds)
        backend = args.backend
    else:
        model = _load_at_precision(args, base)
        from quantizer.execution.executor import build_executor

        unet = build_executor(model.unet, args.backend, max_batch=args.batch_size)
        samples = generate_in_batches(unet, model.scheduler_config, seeds, args.sampler, args.steps,
                                      args.batch_size, eta=args.eta, class_labels=labels, decoder=model.decoder)
        images = to_uint8(samples)
        backend = getattr(unet, "backend", args.backend)
    out.mkdir(parents=True, exist_ok=True)
    for k, (s, img) in enumerate(zip(seeds, images, strict=True)):
        (out / f"{k:04d}_seed{s}.png").write_bytes(png_bytes(img))
    if args.grid:
        nrow = args.nrow or max(1, int(len(images) ** 0.5))
        (out / "grid.png").write_bytes(png_bytes(grid(images, nrow)))
    print(json.dumps({"out": str(out), "n": args.n, "seeds": [seeds[0], seeds[-1]], "grid": args.grid,
                      "precision": args.precision, "backend": backend,
                      **({"class_labels": labels} if labels is not None else {})}))
    return 0


def _generate_from_text(args: argparse.Namespace, base, seeds: list[int]):  # noqa: ANN001, ANN202
    """uint8 images of a text-to-image model, through the Engine the worker uses (prompt, CFG), batch by batch."""
    import numpy as np

    from quantizer.engine import Engine, model_digest

    engine = Engine(base, model_digest(base), base.unet)
    if args.precision != "fp32":
        engine = engine.quantize(args.precision, _calibration_overrides(args), args.cache_dir)
    engine = engine.compile(args.backend, max_batch=args.batch_size)
    batches = []
    for start in range(0, len(seeds), args.batch_size):
        chunk = seeds[start:start + args.batch_size]
        generation = engine.generate(chunk, args.sampler, args.steps, args.eta, prompts=[args.prompt] * len(chunk),
                                     negative_prompts=[args.negative_prompt] * len(chunk),
                                     guidance_scales=[args.guidance_scale] * len(chunk))
        if generation.non_finite:
            raise ValueError(f"image(s) {list(generation.non_finite)} came out with non-finite values")
        batches.append(generation.images)
    return np.concatenate(batches)


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantizer.ptq.quant_modules import QuantLayer, SplitActQuantizer

    model = _load_at_precision(args)
    if args.precision == "fp32":
        print("fp32: nothing to quantize")
        return 0
    print(f"{'layer':<48} {'w bits':>6} {'a bits':>6} {'a scale':>10} {'a zp':>5}")
    for name, module in model.unet.named_modules():
        if isinstance(module, QuantLayer):
            w, a = module.weight_quantizer, module.input_quantizer
            halves = [("[:k]", a.first), ("[k:]", a.second)] if isinstance(a, SplitActQuantizer) else [("", a)]
            for half, q in halves:  # a split input (split_concat): one row per half
                print(f"{name + half:<48} {int(w.bits):>6} {int(q.bits):>6} {float(q.scale):>10.5f} "
                      f"{int(q.zero_point):>5}")
    print(json.dumps({"model": model.name, "precision": model.precision, "cache_dir": args.cache_dir,
                      "cache_key": model.cache_key, "cache_hit": model.cache_hit,
                      "calibration_hash": model.calibration_hash}))
    return 0


COND_DEFAULT_STEPS = 2000


def cmd_train(args: argparse.Namespace) -> int:
    from quantizer.evaluation.train import COND_MODEL_NAME, TrainConfig, train

    # --class-conditional: the second built-in model, fine-tuned from the first, in folders of its own.
    name = COND_MODEL_NAME if args.class_conditional else "fashion-mnist-ddpm"
    init = args.init or ("models/fashion-mnist-ddpm" if args.class_conditional else None)
    steps = args.steps or (COND_DEFAULT_STEPS if args.class_conditional else 7675)
    warmup = args.warmup_steps if args.warmup_steps is not None else (100 if init else 500)
    cfg = TrainConfig(output_dir=args.out or f"models/{name}", checkpoint_dir=args.checkpoint_dir or f"runs/{name}",
                      steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup, seed=args.seed,
                      max_minutes=args.max_minutes, init=init, num_classes=10 if args.class_conditional else None)
    print(f"exported to {train(cfg)}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from quantizer.evaluation.classifier import ClassifierTrainConfig, train_classifier

    _, acc = train_classifier(ClassifierTrainConfig(epochs=args.epochs, seed=args.seed, output=args.out))
    print(json.dumps({"test_accuracy": round(acc, 4), "out": args.out}))
    return 0


def cmd_eval_fd(args: argparse.Namespace) -> int:
    from quantizer.evaluation.evaluate import evaluate_fd, evaluate_fd_real

    if args.real:
        print(json.dumps(evaluate_fd_real(n=args.n, seed=args.seed, classifier=args.classifier)))
        return 0
    result = evaluate_fd(args.model, sampler=args.sampler, steps=args.steps, n=args.n, seed=args.seed,
                         batch_size=args.batch_size, classifier=args.classifier,
                         samples_dir=None if args.no_resume else args.samples_dir)
    print(json.dumps(result))
    return 0


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    from quantizer.ptq.config import CALIBRATION_METHODS, PRESETS, SERVING_PRESET
    from quantizer.ptq.scale_search import METRICS

    p.add_argument("--precision", default="fp32", help="fp32, w8a8, w4a8, w8a6, w8a16 (any w<b>a<b>)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help="calibration cache (env PTQ4DM_CALIBRATION_CACHE_DIR)")
    p.add_argument("--preset", choices=list(PRESETS), default=SERVING_PRESET,
                   help="starting point of the quantization config (ptq4dm: the paper's method exactly); "
                        "the options below override it")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default=None, help="calibration set (the preset's)")
    p.add_argument("--n-samples", type=_positive_int, default=None, help="calibration samples (default 1024)")
    p.add_argument("--mu", type=float, default=None, help="NDTC mean, fraction of the steps from x_0 (0.4)")
    p.add_argument("--sigma", type=float, default=None, help="NDTC std, fraction of the steps (0.4)")
    p.add_argument("--metric", choices=METRICS, default=None, help="scale-search metric (default lp, p=2.4)")


def add_quantizer_commands(sub: argparse._SubParsersAction) -> None:
    from quantizer.diffusion.models import BUILTIN_MODEL_NAME
    from quantizer.evaluation.classifier import BUILTIN_CLASSIFIER

    g = sub.add_parser("generate", help="sample PNGs from a model")
    g.add_argument("--model", default=BUILTIN_MODEL_NAME, help="built-in name, local diffusers dir, or hub id")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    g.add_argument("--n", type=int, default=16)
    g.add_argument("--seed", type=int, default=None, help="seed of image 0; image k uses seed+k")
    g.add_argument("--class-label", type=int, default=None,
                   help="class of every image (class-conditional models); default: drawn from each image's seed")
    g.add_argument("--prompt", default=None, help="text-to-image models: what every image shows")
    g.add_argument("--negative-prompt", default=None, help="text-to-image models: what to steer away from")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="text-to-image models: classifier-free guidance scale (default 7.5)")
    g.add_argument("--batch-size", type=_positive_int, default=64)
    g.add_argument("--out", default="out")
    g.add_argument("--grid", action="store_true", help="also write grid.png")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="how the UNet runs: auto (openvino for quantized precisions on the CPU, else int8-x86 "
                        "where the CPU has int8 kernels, else fake; eager for fp32), or one backend by name")
    g.add_argument("--nrow", type=int, default=None)
    _add_precision_args(g)
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("quantize", help="calibrate (or load from the cache) and print the per-layer summary")
    q.add_argument("--model", default=BUILTIN_MODEL_NAME)
    _add_precision_args(q)
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train", help="train the built-in Fashion-MNIST DDPM, or fine-tune the class-conditional one "
                                     "from it (resumable: the same command continues from the last checkpoint)")
    t.add_argument("--class-conditional", action="store_true",
                   help="fine-tune --init into a 10-class model (zero-initialised class embedding) on the labels; "
                        "defaults become --init models/fashion-mnist-ddpm, --out models/fashion-mnist-ddpm-cond, "
                        "--checkpoint-dir runs/fashion-mnist-ddpm-cond")
    t.add_argument("--init", default=None, help="start from this model's weights (diffusers folder or built-in name)")
    t.add_argument("--out", default=None, help="export folder (default models/<model name>)")
    t.add_argument("--checkpoint-dir", default=None, help="checkpoints and loss.csv (default runs/<model name>)")
    t.add_argument("--steps", type=_positive_int, default=None,
                   help=f"total steps (default 7675; {COND_DEFAULT_STEPS} with --class-conditional)")
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup-steps", type=int, default=None, help="linear lr warm-up (500; 100 with --init)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-minutes", type=float, default=None, help="stop (checkpoint + export) after this long")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("train-classifier", help="train the FD feature extractor")
    c.add_argument("--out", default=str(BUILTIN_CLASSIFIER))
    c.add_argument("--epochs", type=_positive_int, default=12)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_train_classifier)

    e = sub.add_parser("eval-fd", help="FD of generated samples vs the Fashion-MNIST test set")
    e.add_argument("--model", default=BUILTIN_MODEL_NAME)
    e.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    e.add_argument("--steps", type=int, default=100)
    e.add_argument("--n", type=_positive_int, default=2000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=_positive_int, default=250)
    e.add_argument("--classifier", default=str(BUILTIN_CLASSIFIER))
    e.add_argument("--real", action="store_true", help="score n real training images instead (the FD floor)")
    e.add_argument("--samples-dir", default="runs/samples",
                   help="keep finished batches here; a re-run resumes from them")
    e.add_argument("--no-resume", action="store_true", help="neither read nor write --samples-dir")
    e.set_defaults(func=cmd_eval_fd)
