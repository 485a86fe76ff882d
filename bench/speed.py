"""Speed benchmark of the execution backends: fp32 eager/compiled, bf16 compiled, int8 fake, int8 real (PT2E,
inductor) and OpenVINO (fp32, bf16, and int8 from PTQ4DM's scales).

Why: PTQ only pays if the quantized model runs faster than the float one on real kernels (targets, CIFAR-sized
UNet, batch 16: int8 real >= 1.3x bf16 compiled and >= 4x fp32 eager; int8 weights <= 30% of fp32 bytes).
Run from the repository root; prints a markdown report (and writes it with --out):

    python bench/speed.py --out runs/bench-speed.md          # both models, batch 1 and 16 (~25 min, 2 cores)
    python bench/speed.py --quick                            # built-in model, batch 1 and 4, smoke run
    python bench/speed.py --models cifar --batches 16 --profile   # per-operator time, bf16 vs int8 real
    python bench/speed.py --models builtin --batches 16,32,64,128,256 --variants "int8 real" --gen-repeats 0 \
        --no-rss                                        # UNet pass size for long (DDPM-1000) sampling runs

Method. Per model, every variant is built first (compile time recorded), then timed *interleaved*: each
repeat runs every variant once, in a fresh random order, so a noisy neighbour slows all of them alike; the table
gives the median and ratios against fp32 eager of the same run. "UNet" is the mean forward over t = 125, 375, 625, 875
(one per quarter, so a time-step-grouped preset counts each of its graphs); "DDIM-50" one full generation
through `quantizer.diffusion.sampling.sample` (scheduler steps included). Memory:
"weights" is bytes of the tensors the variant computes with (for compiled graphs, the graph's constants);
"peak RSS" is measured in a separate process per variant that builds it, compiles every batch bucket up to the
largest batch (as a worker does) and runs one forward.

Models: the built-in Fashion-MNIST UNet (2.7M params, its real weights, PTQ4DM W8A8 NDTC calibration with a
small calibration set: speed does not depend on the scale values) and a CIFAR-10-sized UNet2DModel (the DDPM
CIFAR-10 architecture, 35.7M params) with random weights and a min-max calibration on a few random inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import device_and_dtype, sample, sample_shape
from quantizer.execution.executor import BackendUnavailable, build_executor, weight_bytes
from quantizer.ptq.pipeline import quantize_model

# google/ddpm-cifar10-32's architecture (35.7M parameters; single-head attention at 16x16, as in DDPM).
CIFAR_UNET_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
    "norm_eps": 1e-6, "norm_num_groups": 32,
}
# label, precision, backend; a precision "w8a8 <preset> [field=json ...]" names a preset and overrides of it
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("fp32 eager", "fp32", "eager"),
    ("fp32 compiled", "fp32", "compiled"),
    ("bf16 compiled", "fp32", "bf16"),
    ("int8 fake", "w8a8", "fake"),
    ("int8 real", "w8a8", "int8-x86"),
    ("int8+bf16 real", "w8a8", "int8-bf16-x86"),
    ("fp32 openvino", "fp32", "openvino-fp32"),
    ("bf16 openvino", "fp32", "openvino-bf16"),
    ("int8 openvino", "w8a8", "openvino"),  # PTQ4DM's scales, fp32 elsewhere
    ("int8+bf16 openvino", "w8a8", "openvino-int8-bf16"),
    # 4-bit weights: exact on u8 x s8 kernels without VNNI too (no int16 saturation), unlike 8-bit ones
    ("w4a8 openvino", "w4a8", "openvino"),
    # ... and so are 7-bit ones (2 * 255 * 64 fits int16): W7A8, the served preset too
    ("w7a8 openvino", "w7a8", "openvino"),
    ("faithful w7a8 openvino", "w7a8 faithful", "openvino"),
    # The presets the CLI and the service serve: four time-step graphs (two float ones for `faithful`).
    ("recommended openvino", "w8a8 recommended", "openvino"),
    ("faithful openvino", "w8a8 faithful", "openvino"),
    ("faithful openvino-int8-bf16", "w8a8 faithful", "openvino-int8-bf16"),
    # Cheaper `faithful`s, measured for fidelity in docs/RESULTS.md: symmetric activation ranges (i8 kernels without
    # zero-points) and only the last quarter of the time-steps in fp32.
    ("recommended symmetric openvino", "w8a8 recommended act_symmetric=true", "openvino"),
    ("faithful symmetric openvino", "w8a8 faithful act_symmetric=true", "openvino"),
    ("faithful t>=750 openvino", "w8a8 faithful float_groups=1", "openvino"),
    ("faithful t>=750 symmetric openvino", "w8a8 faithful float_groups=1 act_symmetric=true", "openvino"),
    # ... and three quarters in fp32 (t >= 250): what the worst DDPM-1000 seeds need (bench/seed_probe.py), and what
    # `faithful` runs for requests of more than 100 steps (float_groups_by_steps; forwards here are timed directly)
    ("faithful t>=250 openvino", "w8a8 faithful float_groups=3", "openvino"),
    # `faithful` whose noise-end half runs int8 on its own ranges except the last up block's resnet outputs (conv2
    # and conv_shortcut), the layers the noise-end sensitivity ranking puts first (docs/SENSITIVITY.md).
    ("balanced openvino", "w8a8 balanced", "openvino"),
    ("balanced symmetric openvino", "w8a8 balanced act_symmetric=true", "openvino"),
    # `faithful` whose noise-end half runs int8 plus a second int8 pass over each input's rounding residual (but for
    # a few layers in fp32), and the same with every layer on its residual pass
    ("residual openvino", "w8a8 residual", "openvino"),
    ("residual every layer openvino", "w8a8 residual float_group_layers=[]", "openvino"),
)
# One forward per quarter of the time-steps, so a time-step-grouped preset is timed over all of its graphs.
TIMESTEPS = (125, 375, 625, 875)


def cifar_model() -> DiffusionModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR_UNET_CONFIG).eval()
    return DiffusionModel(name="cifar10-sized-random", unet=unet,
                          scheduler_config=load_model(None).scheduler_config)


def quantized(model: DiffusionModel, precision: str = "w8a8", extra: dict | None = None) -> DiffusionModel:
    """The speed variants' W8A8 model; "w8a8 <preset> [field=json ...]" is that preset (the built-in model's shipped
    statistics) with those fields overridden; `extra` overrides fields of either."""
    bits, _, spec = precision.partition(" ")
    preset, *fields = spec.split() or [""]
    if model.name == "cifar10-sized-random":  # random weights: min-max ranges from a few random trajectories
        overrides: dict = {"n_samples": 8, "steps": 4, "batch_size": 8, "search": "minmax"}
    else:
        overrides = {"n_samples": 64, "steps": 25}
    if preset:
        overrides = {"preset": preset, **(overrides if model.name == "cifar10-sized-random" else {})}
        overrides.update({key: json.loads(value) for key, value in (field.split("=", 1) for field in fields)})
    return quantize_model(model, bits, {**overrides, **(extra or {})}, cache_dir="runs/calibration-cache",
                          progress=False)


def build_variants(model: DiffusionModel, max_batch: int,
                   only: Collection[str] | None = None) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """Executors for every variant (or those in `only`) plus each one's build time (quantization excluded,
    compile included)."""
    qmodels: dict[str, DiffusionModel] = {}
    executors, build_s = {}, {}
    for label, precision, backend in VARIANTS:
        if only is not None and label not in only:
            continue
        if precision != "fp32" and precision not in qmodels:
            qmodels[precision] = quantized(model, precision)
        source = model.unet if precision == "fp32" else qmodels[precision].unet
        start = time.perf_counter()
        try:
            executor = build_executor(source, backend, max_batch=max_batch)
        except BackendUnavailable as exc:  # e.g. no native bf16 here: the row is left out, and says why
            print(f"skipping {label}: {exc}", file=sys.stderr)
            continue
        if hasattr(executor, "warmup"):
            executor.warmup([max_batch])
        build_s[label] = time.perf_counter() - start
        executors[label] = executor
    return executors, build_s


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of interleaved_times."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, repeats, seed).items()}


def paired_ratio(times: dict[str, list[float]], slower: str, faster: str) -> float:
    """Median over repeats of one repeat's time of `slower` over the same repeat's time of `faster`: a neighbour
    that slows the machine for a while slows both calls of a repeat, so the pairs cancel what the medians of two
    whole series only partly do (the same graph's median moved by 1.8x between runs on the shared AMD EPYC)."""
    return statistics.median(a / b for a, b in zip(times[slower], times[faster], strict=True))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of each call, per repeat; every repeat runs every function once, in a fresh random order: in a fixed
    order each function would always follow the same one, whose weights it finds in the caches or that evicted its
    own (measured: a fixed order made the first of the batch-1 graphs 8% slower than the same graph placed third)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for label in order:
            fn = fns[label]
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return times


def synchronize(device: torch.device) -> None:
    """Waits for a GPU's queued work (its calls return before it is done); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_call(unet: torch.nn.Module, batch: int) -> Callable[[], object]:
    """One forward at each of TIMESTEPS, at the model's own input shape, on its device and dtype, then a device
    synchronize (a GPU's forwards are asynchronous); time_interleaved's caller divides by len(TIMESTEPS) to report
    a forward."""
    device, dtype = device_and_dtype(unet)
    x = torch.randn(batch, *sample_shape(unet), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    steps = [torch.tensor(t, device=device) for t in TIMESTEPS]

    def run() -> object:
        with torch.no_grad():
            out = [unet(x, t).sample for t in steps]
        synchronize(device)
        return out
    return run


def generation_call(unet: torch.nn.Module, scheduler_config: dict, batch: int) -> Callable[[], object]:
    return lambda: sample(unet, scheduler_config, list(range(batch)), sampler="ddim", steps=50)


@dataclass
class ModelReport:
    name: str
    params: int
    rows: list[dict]


def bench_model(model: DiffusionModel, batches: list[int], repeats: int, gen_repeats: int,
                rss: dict[str, int], only: Collection[str] | None = None) -> ModelReport:
    rows = []
    for batch in batches:
        executors, build_s = build_variants(model, max_batch=batch, only=only)
        fwd = time_interleaved({k: unet_call(u, batch) for k, u in executors.items()}, repeats)
        gen = time_interleaved({k: generation_call(u, model.scheduler_config, batch)
                                for k, u in executors.items()}, gen_repeats) if gen_repeats else {}
        for label, executor in executors.items():
            rows.append({
                "batch": batch, "variant": label, "unet_ms": fwd[label] * 1e3 / len(TIMESTEPS),
                "unet_x": fwd["fp32 eager"] / fwd[label],
                "gen_s": gen.get(label), "gen_x": gen["fp32 eager"] / gen[label] if gen else None,
                "build_s": build_s[label], "weights_mb": weight_bytes(executor) / 2**20,
                "rss_mb": rss.get(f"{label}@{batch}"),
            })
        del executors
    return ModelReport(model.name, sum(p.numel() for p in model.unet.parameters()), rows)


def child_peak_rss(model_name: str, label: str, batch: int) -> int | None:
    """Peak RSS (MiB) of a fresh process that builds one variant and runs one forward (None: unavailable here)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", model_name, label, str(batch)],
                         check=True, capture_output=True, text=True).stdout
    peak = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]
    return None if peak is None else int(peak)


def rss_child(model_name: str, label: str, batch: int) -> None:
    """Like a serving worker: every bucket up to `batch` compiled (then the build-time float copies are freed)."""
    model = cifar_model() if model_name == "cifar10-sized-random" else load_model(model_name)
    executors, _ = build_variants(model, batch, only={label})
    if label not in executors:  # unavailable here
        print(json.dumps({"peak_rss_mb": None, "rss_mb": None}))
        return
    executor = executors[label]
    del executors
    if hasattr(executor, "warmup"):
        executor.warmup(range(1, batch + 1))
    del model
    unet_call(executor, batch)()
    import gc

    gc.collect()
    with open("/proc/self/status") as fh:
        current = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "rss_mb": current // 1024}))


def profile(model: DiffusionModel, batch: int, calls: int = 3) -> None:
    """Where a forward's time goes, per operator (the 'Reading' section of docs/BENCHMARKS.md)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for label in ("bf16 compiled", "int8 real"):
        executors, _ = build_variants(model, batch, only={label})
        run = unet_call(executors[label], batch)
        run()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run()
        print(f"### {label}, batch {batch}, {calls} forwards")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def cpu_summary() -> str:
    flags: set[str] = set()
    name = platform.processor()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))
    return f"{name}, {os.cpu_count()} cores; flags: {' '.join(wanted)}"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(reports: list[ModelReport], args: argparse.Namespace) -> str:
    lines = [
        "## Execution backends (bench/speed.py)",
        "",
        f"Command: `python bench/speed.py {shlex.join(sys.argv[1:])}`  ",
        f"Machine: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.repeats} interleaved repeats per UNet forward, {args.gen_repeats} per DDIM-50 generation (medians).",
        "",
    ]
    for rep in reports:
        lines += [f"### {rep.name} ({rep.params / 1e6:.1f}M params)", "",
                  "| batch | variant | UNet fwd ms | x fp32 eager | DDIM-50 s | x fp32 eager | build s "
                  "| weights MiB | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rep.rows:
            lines.append(f"| {r['batch']} | {r['variant']} | {r['unet_ms']:.1f} | {r['unet_x']:.2f} | "
                         f"{fmt(r['gen_s'], '.2f')} | {fmt(r['gen_x'], '.2f')} | {r['build_s']:.1f} | "
                         f"{r['weights_mb']:.1f} | {fmt(r['rss_mb'], 'd')} |")
        for batch in sorted({r["batch"] for r in rep.rows}):
            by = {r["variant"]: r for r in rep.rows if r["batch"] == batch}
            if "int8 openvino" in by:
                best_torch = min((v for v in ("int8 real", "int8+bf16 real", "bf16 compiled") if v in by),
                                 key=lambda v: by[v]["unet_ms"], default=None)
                lines.append("")
                versus = (f"{by[best_torch]['unet_ms'] / by['int8 openvino']['unet_ms']:.2f}x {best_torch} (the "
                          "fastest torch variant), " if best_torch else "")
                lines.append(f"Batch {batch}: int8 openvino is {versus}"
                             f"{by['int8 openvino']['unet_x']:.2f}x fp32 eager per UNet forward; built (converted once,"
                             f" compiled for this batch size) in {by['int8 openvino']['build_s']:.1f} s.")
            if "int8 real" in by and "bf16 compiled" in by:
                lines.append("")
                vs_bf16 = by["bf16 compiled"]["unet_ms"] / by["int8 real"]["unet_ms"]
                lines.append(f"Batch {batch}: int8 real is {vs_bf16:.2f}x bf16 compiled and "
                             f"{by['int8 real']['unet_x']:.2f}x fp32 eager per UNet forward; "
                             f"int8 weights are {by['int8 real']['weights_mb'] / by['fp32 eager']['weights_mb']:.0%} "
                             "of fp32.")
        if len({r["batch"] for r in rep.rows}) > 1:  # which UNet pass size a long sampling run should use
            lines.append("")
            for variant in dict.fromkeys(r["variant"] for r in rep.rows):
                per_image = ", ".join(f"{r['unet_ms'] / r['batch']:.2f} at batch {r['batch']}"
                                      for r in rep.rows if r["variant"] == variant)
                lines.append(f"Per image, {variant}: {per_image} (ms per UNet forward / batch).  ")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="builtin,cifar", help="comma list of builtin, cifar")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--gen-repeats", type=int, default=3, help="0 skips the DDIM-50 generations")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-variant peak-RSS processes")
    parser.add_argument("--variants", default=None,
                        help="comma list of variant labels to run (fp32 eager, the ratios' base, is always run)")
    parser.add_argument("--quick", action="store_true", help="built-in model, batches 1,4, few repeats")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler tables of bf16 compiled and int8 real (first model/batch)")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return 0
    if args.quick:
        args.models, args.batches, args.repeats, args.gen_repeats, args.no_rss = "builtin", "1,4", 3, 1, True
    batches = [int(b) for b in args.batches.split(",")]
    labels = [label for label, _, _ in VARIANTS]
    only = None
    if args.variants is not None:
        only = {"fp32 eager", *(v.strip() for v in args.variants.split(","))}
        if unknown := sorted(only - set(labels)):
            parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(labels)}")
    if args.profile:
        key = args.models.split(",")[0]
        profile(cifar_model() if key == "cifar" else load_model(None), batches[0])
        return 0
    reports = []
    for key in args.models.split(","):
        model = cifar_model() if key == "cifar" else load_model(None)
        rss = {}
        if not args.no_rss:  # at the largest batch only: each is a separate process that compiles its variant
            name = model.name if key == "cifar" else "fashion-mnist-ddpm"
            rss = {f"{label}@{max(batches)}": child_peak_rss(name, label, max(batches))
                   for label in labels if only is None or label in only}
        reports.append(bench_model(model, batches, args.repeats, args.gen_repeats, rss, only))
        print(render(reports, args), flush=True)
    text = render(reports, args)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
