"""GPU benchmark: what the UNet costs on a CUDA device in fp32, bf16 and fp16 eager, bf16 compiled and the W8A8
simulation (`fake`, what the service runs for a quantized model off the CPU), and whether the GPU's images match.

Why: every number in docs/BENCHMARKS.md is from a 2-core CPU. These are the project's first GPU numbers: how much
a GPU gains per UNet forward and per generation, whether the int8 simulation (no real int8 GPU kernels exist here)
costs more than float there too, how far bf16/fp16 images drift from fp32 ones, and whether CUDA fp32 reproduces
the CPU's fp32 images (cuDNN's TF32 convolutions are on by default in torch, so a row measures them off too).
Run from the repository root; prints a markdown report (and writes it with --out after every stage, so a run cut
short still leaves what it measured):

    bash bench/gpu_run.sh                                    # on the GPU machine: carried wheels, then the line below
    python bench/gpu.py --device cuda --out runs/bench-gpu.md    # both models, batch 1/16/64 (~3-4 min on an H200)
    python bench/gpu.py --device cpu --quick                     # smoke run: built-in model, batch 1 and 2, no compile

Method. The models and the W8A8 calibration are bench/speed.py's (`cifar_model`, `quantized`: the built-in
Fashion-MNIST UNet with its real weights, and a CIFAR-10-sized UNet2DModel with random weights); calibration runs
on the CPU, then the fake-quant model moves to the device. "bf16 compiled" is the project's `bf16` backend
(torch.export + inductor, one static graph per batch-size bucket, default mode); its graphs are compiled largest
batch first until --compile-budget seconds per model are spent (a batch left without a graph says so). Every
variant is timed *interleaved*: each repeat runs every variant once (one forward at each of speed.py's TIMESTEPS,
the device synchronized after them), the table gives medians and ratios against fp32 eager of the same run.
"DDIM-50" is one full generation through `quantizer.diffusion.sampling.sample` (scheduler steps on the CPU, as
served). Fidelity: mean (and worst) per-image PSNR of the variants' images against fp32 images on the same device,
same seeds, DDIM-25, and of the device's fp32 / W8A8 images against the CPU's (identical = 100 dB).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from speed import (  # bench/ is the script's directory
    TIMESTEPS,
    cifar_model,
    fmt,
    quantized,
    synchronize,
    time_interleaved,
    unet_call,
)
from torch import nn

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.metrics import capped_psnr
from quantizer.execution.executor import ExecutableUNet, bucket, build_executor

VARIANTS = ("fp32 eager", "bf16 eager", "fp16 eager", "bf16 compiled", "int8 fake")
EAGER_DTYPES = {"fp32 eager": torch.float32, "bf16 eager": torch.bfloat16, "fp16 eager": torch.float16}
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def short_error(exc: BaseException) -> str:
    """One line for a table cell; the traceback's tail goes to the log."""
    print("".join(traceback.format_exception(exc, limit=-4))[-3000:], file=sys.stderr, flush=True)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:200].replace("|", "/")


@dataclass
class ModelResult:
    name: str
    params: int = 0
    notes: list[str] = field(default_factory=list)
    forward: list[dict] = field(default_factory=list)
    generation: list[dict] = field(default_factory=list)
    fidelity: list[dict] = field(default_factory=list)


def runs_at(unet: nn.Module, batch: int) -> bool:
    """A compiled executor runs a batch only once its bucket's graph is built (no compiling inside the timing)."""
    return not isinstance(unet, ExecutableUNet) or bucket(batch, unet.max_batch) in unet.compile_seconds


def build_units(model: DiffusionModel, device: torch.device, args: argparse.Namespace, res: ModelResult,
                wanted: list[str], max_batch: int) -> tuple[dict[str, nn.Module], dict[str, str], nn.Module | None]:
    """Each variant's UNet on the device (or its error), plus the fake-quant UNet left on the CPU."""
    units: dict[str, nn.Module] = {}
    errors: dict[str, str] = {}
    quant_cpu = None
    for label in wanted:
        start = time.perf_counter()
        try:
            if label in EAGER_DTYPES:
                units[label] = copy.deepcopy(model.unet).to(device=device, dtype=EAGER_DTYPES[label]).eval()
            elif label == "bf16 compiled":
                if args.no_compile:
                    errors[label] = "skipped (--no-compile)"
                    continue
                units[label] = compiled_unit(model, device, args, res, max_batch)
            elif label == "int8 fake":
                qmodel = quantized(model)  # on the CPU, where bench/speed.py calibrates
                res.notes.append(f"W8A8 calibration (bench/speed.py's, on the CPU): "
                                 f"{time.perf_counter() - start:.1f} s, stats {getattr(qmodel, 'stats_source', '?')}")
                quant_cpu = qmodel.unet
                units[label] = build_executor(copy.deepcopy(quant_cpu).to(device), "fake")
            log(f"{res.name}: built {label} in {time.perf_counter() - start:.1f} s")
        except Exception as exc:  # noqa: BLE001 - a failed variant is a row, not the end of the run
            errors[label] = short_error(exc)
            log(f"{res.name}: {label} failed: {errors[label]}")
    return units, errors, quant_cpu


def compiled_unit(model: DiffusionModel, device: torch.device, args: argparse.Namespace, res: ModelResult,
                  max_batch: int) -> nn.Module:
    """The `bf16` backend's executor with graphs for the timed batches, largest first, within the budget."""
    executor = build_executor(copy.deepcopy(model.unet).to(device), "bf16", max_batch=max_batch)
    wanted = sorted({bucket(b, max_batch) for b in args.batch_list + [args.gen_batch, args.seeds]}, reverse=True)
    skipped = []
    for b in wanted:
        spent = sum(executor.compile_seconds.values())
        if spent >= args.compile_budget:
            skipped.append(b)
            continue
        log(f"{res.name}: compiling bf16 graph for batch {b}")
        executor.warmup([b])
        log(f"{res.name}: bf16 graph for batch {b} compiled in {executor.compile_seconds[b]:.1f} s")
    compiled = ", ".join(f"batch {b} {s:.1f} s" for b, s in sorted(executor.compile_seconds.items()))
    res.notes.append(f"bf16 compiled (torch.export + inductor, default mode) compile time: {compiled}"
                     + (f"; not compiled (budget {args.compile_budget:.0f} s spent): batch "
                        f"{', '.join(map(str, skipped))}" if skipped else ""))
    return executor


def time_forwards(units: dict[str, nn.Module], errors: dict[str, str], batch: int, repeats: int,
                  res: ModelResult) -> None:
    calls, failed = {}, {}
    for label, unet in units.items():
        if not runs_at(unet, batch):
            failed[label] = "no graph for this batch (compile budget spent)"
            continue
        try:  # one untimed call each: a variant that fails here is a row with its error
            call = unet_call(unet, batch)
            call()
            calls[label] = call
        except Exception as exc:  # noqa: BLE001
            failed[label] = short_error(exc)
    try:
        seconds = time_interleaved(calls, repeats) if calls else {}
    except Exception as exc:  # noqa: BLE001 - a variant broke after its first call: this batch has no timings
        error = short_error(exc)
        failed.update({label: f"timing failed: {error}" for label in calls})
        seconds = {}
    base = seconds.get("fp32 eager")
    for label in VARIANTS:
        if label in seconds:
            ms = seconds[label] * 1e3 / len(TIMESTEPS)
            res.forward.append({"batch": batch, "variant": label, "ms": ms, "per_image": ms / batch,
                                "x": base / seconds[label] if base else None})
        elif label in failed or label in errors:
            res.forward.append({"batch": batch, "variant": label, "error": failed.get(label) or errors[label]})
    log(f"{res.name}: batch {batch} timed: " + ", ".join(f"{k} {v * 1e3 / len(TIMESTEPS):.2f} ms"
                                                         for k, v in seconds.items()))


def time_generation(units: dict[str, nn.Module], model: DiffusionModel, device: torch.device,
                    args: argparse.Namespace, res: ModelResult) -> None:
    seeds = list(range(args.gen_batch))
    ready, failed = {}, {}
    for label, unet in units.items():
        if not runs_at(unet, args.gen_batch):
            continue
        try:  # warm-up at this batch size: two steps
            sample(unet, model.scheduler_config, seeds, sampler="ddim", steps=2)
            ready[label] = unet
        except Exception as exc:  # noqa: BLE001
            failed[label] = short_error(exc)
    times: dict[str, list[float]] = {k: [] for k in ready}
    for _ in range(args.gen_repeats):
        for label, unet in list(ready.items()):
            synchronize(device)
            start = time.perf_counter()
            try:
                sample(unet, model.scheduler_config, seeds, sampler="ddim", steps=args.gen_steps)
            except Exception as exc:  # noqa: BLE001
                failed[label] = short_error(exc)
                del ready[label], times[label]
                continue
            synchronize(device)
            times[label].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    base = medians.get("fp32 eager")
    for label in VARIANTS:
        if label in medians:
            res.generation.append({"variant": label, "s": medians[label], "ips": args.gen_batch / medians[label],
                                   "x": base / medians[label] if base else None})
        elif label in failed:
            res.generation.append({"variant": label, "error": failed[label]})
    log(f"{res.name}: DDIM-{args.gen_steps} x {args.gen_batch} timed: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in medians.items()))


def fidelity(units: dict[str, nn.Module], quant_cpu: nn.Module | None, model: DiffusionModel,
             device: torch.device, args: argparse.Namespace, res: ModelResult) -> None:
    seeds = list(range(args.seeds))

    def images(unet: nn.Module) -> np.ndarray:
        return to_uint8(sample(unet, model.scheduler_config, seeds, sampler="ddim", steps=args.fid_steps))

    def compare(what: str, reference: Callable[[], np.ndarray], test: Callable[[], np.ndarray]) -> None:
        try:
            per_image = capped_psnr(reference(), test())
            res.fidelity.append({"what": what, "mean": float(per_image.mean()), "min": float(per_image.min()),
                                 "identical": int((per_image >= 100).sum())})
        except Exception as exc:  # noqa: BLE001
            res.fidelity.append({"what": what, "error": short_error(exc)})
        log(f"{res.name}: fidelity {what}: " + (f"{res.fidelity[-1]['mean']:.2f} dB" if "mean" in res.fidelity[-1]
                                                else res.fidelity[-1]["error"]))

    cache: dict[str, np.ndarray] = {}

    def cached(key: str, make: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def get() -> np.ndarray:
            if key not in cache:
                cache[key] = make()
            return cache[key]
        return get

    dev = device.type
    fp32_dev = cached("fp32 dev", lambda: images(units["fp32 eager"]))
    for label in ("bf16 eager", "fp16 eager", "bf16 compiled", "int8 fake"):
        if label in units and runs_at(units[label], args.seeds):
            compare(f"{label} vs fp32 eager, both on {dev}", fp32_dev, lambda u=units[label]: images(u))
    fp32_cpu = cached("fp32 cpu", lambda: images(model.unet))
    compare(f"fp32 {dev} vs fp32 cpu", fp32_cpu, fp32_dev)
    if device.type == "cuda":
        def without_tf32() -> np.ndarray:
            flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                return images(units["fp32 eager"])
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        compare(f"fp32 {dev} with TF32 off (cuDNN and matmul) vs fp32 cpu", fp32_cpu, without_tf32)
    if quant_cpu is not None and "int8 fake" in units:
        compare(f"int8 fake {dev} vs int8 fake cpu", lambda: images(quant_cpu), lambda: images(units["int8 fake"]))
        compare("int8 fake cpu vs fp32 cpu (the CPU's own quantization error)", fp32_cpu, lambda: images(quant_cpu))


def bench_model(key: str, device: torch.device, args: argparse.Namespace, res: ModelResult,
                flush: Callable[[], None]) -> None:
    log(f"{key}: loading")
    model = cifar_model() if key == "cifar" else load_model(None)
    res.name = model.name
    res.params = sum(p.numel() for p in model.unet.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    max_batch = max(args.batch_list + [args.gen_batch, args.seeds])
    units, errors, quant_cpu = build_units(model, device, args, res, args.variant_list, max_batch)
    flush()
    if "fp32 eager" not in units:
        res.notes.append(f"fp32 eager failed ({errors.get('fp32 eager')}): nothing else is measured")
        return
    for batch in args.batch_list:
        time_forwards(units, errors, batch, args.repeats, res)
        flush()
    if args.gen_repeats:
        time_generation(units, model, device, args, res)
        flush()
    if args.seeds:
        fidelity(units, quant_cpu, model, device, args, res)
    if device.type == "cuda":
        res.notes.append(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")
    flush()


def machine(device: torch.device) -> str:
    cpu = f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    if device.type != "cuda":
        return f"CPU only ({cpu}); torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} (compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}; TF32: cuDNN convolutions {torch.backends.cudnn.allow_tf32}, matmul "
            f"{torch.backends.cuda.matmul.allow_tf32} (torch's defaults, as the service runs); cudnn.benchmark "
            f"{torch.backends.cudnn.benchmark}; {cpu}")


def table(header: list[str], rows: list[dict], key: Callable[[dict], list[str]],
          cells: Callable[[dict], list[str]]) -> list[str]:
    """A markdown table: each row's key cells, then its measured cells or its error and dashes."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = key(r)
        values += [r["error"], *["-"] * (len(header) - len(values) - 1)] if "error" in r else cells(r)
        lines.append("| " + " | ".join(values) + " |")
    return lines


def render(results: list[ModelResult], args: argparse.Namespace, device: torch.device) -> str:
    lines = [
        "## GPU (bench/gpu.py)", "",
        f"Command: `python bench/gpu.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {machine(device)}.  ",
        f"{args.repeats} interleaved repeats per UNet forward (medians; a forward is the mean over t = "
        f"{', '.join(map(str, TIMESTEPS))}); {args.gen_repeats} DDIM-{args.gen_steps} generation(s) of "
        f"{args.gen_batch} images per variant (median); fidelity over {args.seeds} seeds, DDIM-{args.fid_steps}.",
        "",
    ]
    for res in results:
        lines += [f"### {res.name} ({res.params / 1e6:.1f}M params)", ""]
        lines += [f"- {note}" for note in res.notes]
        if res.forward:
            lines += ["", *table(["batch", "variant", "UNet fwd ms", "x fp32 eager", "ms per image"], res.forward,
                                 lambda r: [str(r["batch"]), r["variant"]],
                                 lambda r: [f"{r['ms']:.2f}", fmt(r["x"], ".2f"), f"{r['per_image']:.3f}"])]
        if res.generation:
            lines += ["", f"DDIM-{args.gen_steps}, {args.gen_batch} images in one batch (`sample`, scheduler on the "
                      "CPU):", "", *table(["variant", "s", "images/s", "x fp32 eager"], res.generation,
                                          lambda r: [r["variant"]],
                                          lambda r: [f"{r['s']:.2f}", f"{r['ips']:.1f}", fmt(r["x"], ".2f")])]
        if res.fidelity:
            lines += ["", f"Fidelity, {args.seeds} seeds, DDIM-{args.fid_steps} (per-image PSNR capped at 100 dB = "
                      "identical):", "", *table(["images", "mean PSNR dB", "worst PSNR dB", "identical"],
                                                res.fidelity, lambda r: [r["what"]],
                                                lambda r: [f"{r['mean']:.2f}", f"{r['min']:.2f}",
                                                           f"{r['identical']}/{args.seeds}"])]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="builtin,cifar", help="comma list of builtin, cifar")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)} (fp32 eager, the ratios' base, is always run)")
    parser.add_argument("--no-compile", action="store_true", help="leave out bf16 compiled")
    parser.add_argument("--compile-budget", type=float, default=60.0,
                        help="seconds of bf16 compiling per model; batches left when it is spent get no graph")
    parser.add_argument("--gen-batch", type=int, default=64, help="images in the timed generation")
    parser.add_argument("--gen-steps", type=int, default=50)
    parser.add_argument("--gen-repeats", type=int, default=1, help="0 skips the generations")
    parser.add_argument("--seeds", type=int, default=16, help="images per fidelity comparison (0 skips them)")
    parser.add_argument("--fid-steps", type=int, default=25)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: built-in model, batches 1,2, 2 repeats, no compile, 4 seeds, few steps")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.repeats, args.no_compile = "builtin", "1,2", 2, True
        args.gen_batch, args.gen_steps, args.seeds, args.fid_steps = 2, 10, 4, 5
    args.batch_list = [int(b) for b in args.batches.split(",")]
    chosen = {v.strip() for v in args.variants.split(",")} | {"fp32 eager"}
    if unknown := sorted(chosen - set(VARIANTS)):
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variant_list = [v for v in VARIANTS if v in chosen]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (try --device cpu --quick)")
    log(f"machine: {machine(device)}")

    results: list[ModelResult] = []

    def flush() -> None:
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(render(results, args, device) + "\n")

    for key in args.models.split(","):
        res = ModelResult(name=key)
        results.append(res)
        try:
            bench_model(key, device, args, res, flush)
        except Exception as exc:  # noqa: BLE001 - keep the other model's numbers
            res.notes.append(f"stopped: {short_error(exc)}")
        flush()
        log(f"{res.name}: done")
    print(render(results, args, device), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
