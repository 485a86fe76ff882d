"""Quality report of PTQ4DM on the built-in model: our version of the paper's Table 5 and its ablations.

Writes docs/RESULTS.md (and docs/results_fd.png) from docs/results.json. Every (sampler, variant) row is
computed once and stored in that committed file as soon as it is done, so rows accumulate over sessions and
machines; the samples behind a row are kept per batch under runs/samples (see
quantizer.evaluation.evaluate.generate_in_batches), so an interrupted run resumes where it stopped on the same machine.
The FP images that PSNR/SSIM compare against are also committed, as uint8 batches under bench/references/:
a DDPM-1000 FP reference costs ~3 h of this CPU (eight batches of 250 at ~21 min, fp32 eager, 2 threads,
2026-11-30), and the comparison is in uint8 anyway.

    python bench/quality.py --samplers ddim25 --out docs/RESULTS.md            # one sampler, every variant
    python bench/quality.py --samplers ddim100,ddpm1000 --only "fp32,w8a8 *"  # more rows, filtered by label
    python bench/quality.py --render                                         # rewrite the report only

Rows are independent and results.json updates are locked, so several runs may fill different --only rows side
by side. On the 2-core machine two one-thread runs pinned with taskset showed no more total DDPM-1000 throughput
in their progress bars than one two-thread run (observed, not benchmarked); one run loses less when stopped.

Per row: FD of N generated images (seeds 0..N-1, the same for every variant) vs the Fashion-MNIST test split
in the project classifier's penultimate features, and mean PSNR / SSIM of each image against the FP image of
the same seed. Quantized rows run on `--backend` (fake: the simulation; int8-x86: the real int8 kernels);
the table has one column group per backend.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.evaluation.classifier import load_classifier
from quantizer.evaluation.data import fashion_mnist_tensor
from quantizer.evaluation.evaluate import (
    generate_in_batches,
    reference_stats,
    samples_cache_dir,
    seed_batch_files,
    seed_batch_path,
)
from quantizer.evaluation.fd import extract_features, frechet_distance, gaussian_stats
from quantizer.evaluation.metrics import capped_psnr, ssim
from quantizer.execution.executor import build_executor
from quantizer.ptq.cache import atomic_write, cache_key
from quantizer.ptq.pipeline import build_config, quantize_model

RESULTS_JSON = Path("docs/results.json")
REFERENCES = Path("bench/references")
SAMPLERS = {"ddim25": ("ddim", 25), "ddim100": ("ddim", 100), "ddpm1000": ("ddpm", 1000)}
READING_MARKER = "<!-- reading: written by hand, kept by bench/quality.py -->"
METHODS = ("ndtc", "ndtc_code", "uniform", "single_step", "real_noised")
MAX_CALIBRATION_STEPS = 100
PRIMARY_BACKEND = "int8-x86"  # every row runs on it; `fake` rows where the simulation is compared
DDIM100 = {"sampler": "ddim", "steps": 100}
# table -> (title, main-table rows shown beside its own for comparison)
TABLES = {
    "main": ("Calibration methods", ()),
    "metric": ("Ablation: scale-search metric (W4A8, NDTC)", ("fp32", "w4a8 ndtc")),
    "ndtc": ("Ablation: NDTC mu / sigma (W4A8; fractions of the steps from x_0)", ("fp32", "w4a8 ndtc")),
    "seed": ("Spread over calibration seeds (W8A8; seed 0 is the main table's row)",
             ("fp32", "w8a8 ndtc", "w8a8 uniform", "w8a8 single_step")),
    "calib": ("Calibration sampler differs from the serving one (trajectories from DDIM-100)",
              ("fp32", "w8a8 ndtc", "w4a8 ndtc")),
    "a6": ("6-bit activations (W8A6)", ("fp32", "w8a8 ndtc", "w8a8 uniform")),
    "preset": ("Presets: one calibration (DDIM-100 trajectories) for every column", ("fp32", "w8a8 ndtc", "w4a8 ndtc")),
}
GROUPS = {"method": "uniform", "timestep_groups": 4, "keep_first_last_fp": True}  # the first 'recommended'


@dataclass(frozen=True)
class Variant:
    label: str
    precision: str
    overrides: dict[str, Any] = field(default_factory=dict)
    table: str = "main"  # a key of TABLES
    per_sampler: bool = True  # False: one calibration serves every column (the presets' promise)

    def calibration(self, sampler: str, steps: int) -> dict[str, Any]:
        """The calibration overrides for a row: NDTC is defined over the sampler's own steps, so trajectories
        come from the sampler being evaluated (DDIM-25 rows calibrate on DDIM-25); DDPM-1000 rows fall back to
        the DDIM-100 default, 1000-step trajectories being too slow here. A variant's own overrides win.
        Preset rows keep their own calibration whatever the column, as the service does."""
        if not self.per_sampler:
            return dict(self.overrides)
        own = {"sampler": sampler, "steps": steps} if steps <= MAX_CALIBRATION_STEPS else DDIM100
        return {**own, **self.overrides}

    def key(self, sampler: str, steps: int) -> str:
        """Names the row's cached samples: by the resolved config as this column's step count runs it
        (`PTQ4DMConfig.for_steps`), so a preset whose meaning changed never reuses the samples of its former self,
        and two configs that run the same UNets at these steps share them. Rows without a preset keep their
        earlier keys (and samples)."""
        overrides = self.calibration(sampler, steps)
        if "preset" in overrides:
            overrides = build_config(self.precision, overrides).for_steps(steps).to_dict()
        return f"{self.precision}-{cache_key(overrides)[:10]}"


def samples_tag(variant: Variant, backend: str, sampler: str, steps: int) -> str:
    """The directory under runs/samples/<model>/ holding a row's samples (FP rows have one, whatever backend)."""
    return "fp32" if variant.precision == "fp32" else f"{variant.key(sampler, steps)}-{backend}"


def variants() -> list[Variant]:
    out = [Variant("fp32", "fp32")]
    for precision in ("w8a8", "w4a8"):
        out += [Variant(f"{precision} {m}", precision, {"method": m}) for m in METHODS]
        out.append(Variant(f"{precision} minmax", precision, {"method": "ndtc", "search": "minmax"}))
    for metric in ("mse", "cosine", "l1"):  # p=2.4 is the main table's 'w4a8 ndtc'
        out.append(Variant(f"w4a8 ndtc metric={metric}", "w4a8", {"method": "ndtc", "metric": metric}, "metric"))
    for mu, sigma in ((0.5, 0.35), (0.25, 0.25), (0.1, 0.2), (0.4, 0.8)):
        out.append(Variant(f"w4a8 ndtc mu={mu} sigma={sigma}", "w4a8",
                           {"method": "ndtc", "mu": mu, "sigma": sigma}, "ndtc"))
    for method in ("ndtc", "uniform", "single_step"):  # do the W8A8 differences between methods survive a reseed?
        out += [Variant(f"w8a8 {method} seed={seed}", "w8a8", {"method": method, "seed": seed}, "seed")
                for seed in (1, 2)]
    for precision in ("w8a8", "w4a8"):  # what a service calibrated once for DDIM-100 serves at other step counts
        out.append(Variant(f"{precision} ndtc, calibrated on ddim100", precision, {"method": "ndtc", **DDIM100},
                           "calib"))
    for method in ("ndtc", "uniform"):  # the "W8A6 if cheap": on the int8 kernels, 6-bit grids fit u8
        out.append(Variant(f"w8a6 {method}", "w8a6", {"method": method}, "a6"))
    for precision in ("w8a8", "w4a8"):  # the presets' parts, then the presets the CLI and the service serve
        out.append(Variant(f"{precision} groups", precision, GROUPS, "preset", False))  # recommended before GPTQ
        out += [Variant(f"{precision} {preset}", precision, {"preset": preset}, "preset", False)
                for preset in ("recommended", "faithful")]
        # faithful with only the last quarter of the time-steps (t >= 750) in full precision: does its fp32 share
        # (its speed cost) need to be a half?
        out.append(Variant(f"{precision} faithful fp32 t>=750", precision, {"preset": "faithful", "float_groups": 1},
                           "preset", False))
        # ... and with three quarters (t >= 250): what the worst DDPM-1000 seeds need (bench/seed_probe.py)
        out.append(Variant(f"{precision} faithful fp32 t>=250", precision, {"preset": "faithful", "float_groups": 3},
                           "preset", False))
        # faithful as it was before float_groups_by_steps: t >= 500 in full precision at every step count
        out.append(Variant(f"{precision} faithful fp32 t>=500 only", precision,
                           {"preset": "faithful", "float_groups_by_steps": {}}, "preset", False))
        # faithful with symmetric activation ranges (i8 kernels without zero-points: faster int8 groups)
        out.append(Variant(f"{precision} faithful symmetric", precision, {"preset": "faithful", "act_symmetric": True},
                           "preset", False))
        # faithful whose noise-end groups run int8 but for the layers bench/noise_end_layers.py ranks first
        out.append(Variant(f"{precision} balanced", precision, {"preset": "balanced"}, "preset", False))
        out.append(Variant(f"{precision} balanced symmetric", precision, {"preset": "balanced", "act_symmetric": True},
                           "preset", False))
        # faithful whose noise-end half runs int8 plus a residual pass instead of fp32 (but for a few layers), and the
        # same with every layer on its residual pass
        out.append(Variant(f"{precision} residual", precision, {"preset": "residual"}, "preset", False))
        out.append(Variant(f"{precision} residual every layer", precision,
                           {"preset": "residual", "float_group_layers": []}, "preset", False))
    # 7-bit weights: the widest grid the int8 kernels of CPUs without VNNI compute exactly (the served preset)
    out.append(Variant("w7a8 faithful", "w7a8", {"preset": "faithful"}, "preset", False))
    return out


def same_unets_row(results: dict[str, dict], variant: Variant, backend: str, column: str) -> dict | None:
    """A stored row of this column whose variant runs the same UNets at its step count (same samples tag, e.g.
    `faithful` at DDPM-1000 and `faithful fp32 t>=250`): its numbers are this row's, so they are copied under this
    label, naming the row they come from, instead of sampling the same 2000 images again."""
    if variant.precision == "fp32":
        return None
    sampler, steps = SAMPLERS[column]
    tag = samples_tag(variant, backend, sampler, steps)
    for other in variants():
        row = results.get(f"{column}|{other.label}|{backend}")
        if row is not None and other.label != variant.label and samples_tag(other, backend, sampler, steps) == tag:
            return {**row, "label": variant.label, "table": variant.table,
                    "overrides": variant.calibration(sampler, steps), "same_unets_as": other.label}
    return None


def same_unets_note(row: dict) -> str:
    """' (= <label>)' for a row copied from another label's run (same_unets_row), else ''."""
    return f" (= {row['same_unets_as']})" if "same_unets_as" in row else ""


def load_results(path: Path = RESULTS_JSON) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_result(key: str, row: dict, path: Path = RESULTS_JSON) -> None:
    """Read-modify-write under a lock: several runs (one per core) may fill rows of the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results(path)
        results[key] = row
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n"))


class Evaluator:
    def __init__(self, n: int, batch_size: int, samples_root: Path, forward_batch: int,
                 references: Path = REFERENCES) -> None:
        self.model = load_model(None)
        self.n, self.batch_size, self.samples_root, self.references = n, batch_size, samples_root, references
        self.forward_batch = min(forward_batch, batch_size)
        self.classifier = load_classifier(None)
        self.ref_stats = reference_stats(self.classifier)
        self.real_images = fashion_mnist_tensor("train")[0]

    def samples(self, variant: Variant, backend: str, sampler: str, steps: int,
                seeds: range | None = None) -> tuple[torch.Tensor, dict]:
        info: dict[str, Any] = {}
        model: DiffusionModel = self.model
        if variant.precision != "fp32":
            start = time.perf_counter()
            model = quantize_model(self.model, variant.precision, variant.calibration(sampler, steps),
                                   cache_dir="runs/calibration-cache", real_images=self.real_images)
            info["quantize_s"] = round(time.perf_counter() - start, 1)
            info["calibration_hash"] = model.calibration_hash
            info["config"] = model.config.to_dict()  # what a preset meant when the row was made
        unet = build_executor(model.unet, backend if variant.precision != "fp32" else "eager",
                              max_batch=self.forward_batch)
        cache = samples_cache_dir(self.samples_root, self.model, samples_tag(variant, backend, sampler, steps),
                                  sampler, steps)
        start = time.perf_counter()
        seeds = range(self.n) if seeds is None else seeds
        cached: list[int] = []  # a row resumed from runs/samples times only what it sampled: say how much it did not
        x = generate_in_batches(unet, self.model.scheduler_config, list(seeds), sampler, steps, self.batch_size,
                                cache_dir=cache, forward_batch=self.forward_batch, on_cached=cached.extend)
        info["cached_seeds"] = len(cached)
        info["sampling_s"] = round(time.perf_counter() - start, 1)
        return x, info

    def reference(self, sampler: str, steps: int) -> np.ndarray:
        """uint8 FP images of seeds 0..n-1 from the committed store; each batch it lacks is sampled (or taken
        from runs/samples) and stored there as soon as it is done, so a session cut short keeps what it made."""
        store = samples_cache_dir(self.references, self.model, "fp32-uint8", sampler, steps)
        images = load_uint8_batches(store)
        for start in range(0, self.n, self.batch_size):
            seeds = range(start, min(start + self.batch_size, self.n))
            if any(seed not in images for seed in seeds):
                x, _ = self.samples(variants()[0], "eager", sampler, steps, seeds)
                batch = to_uint8(x)
                images.update(zip(seeds, batch, strict=True))
                save_uint8_batch(store, seeds, batch)
        return np.stack([images[seed] for seed in range(self.n)])

    def row(self, variant: Variant, backend: str, sampler: str, steps: int) -> dict:
        ref = self.reference(sampler, steps) if variant.precision != "fp32" else None  # the FP run first: durable
        x, info = self.samples(variant, backend, sampler, steps)
        fd = frechet_distance(*gaussian_stats(extract_features(self.classifier, x)), *self.ref_stats)
        row = {"label": variant.label, "table": variant.table, "precision": variant.precision,
               "overrides": variant.calibration(sampler, steps),
               "backend": backend if variant.precision != "fp32" else "eager",
               "sampler": f"{sampler}{steps}", "n": self.n, "seeds": f"0..{self.n - 1}", "fd": round(fd, 3), **info}
        if ref is not None:
            a, b = ref, to_uint8(x)
            per_image = capped_psnr(a, b)  # the worst images: a diverging seed hides in a mean
            row["psnr"] = round(float(per_image.mean()), 2)  # mean_psnr's value, from the same per-image PSNRs
            row["psnr_min"] = round(float(per_image.min()), 2)
            row["psnr_p1"] = round(float(np.percentile(per_image, 1)), 2)
            row["ssim"] = round(float(np.mean(ssim(a, b))), 4)
        return row


def save_uint8_batch(store: Path, seeds: range, batch: np.ndarray) -> None:
    """One compressed file per seed range (N x H x W x C uint8), written atomically; an existing one is kept."""
    path = seed_batch_path(store, seeds, ".npz")
    if not path.exists():
        store.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(_npz_bytes(batch)))


def _npz_bytes(batch: np.ndarray) -> bytes:
    """np.savez_compressed into memory: given a path it would append .npz to atomic_write's temp name."""
    buf = io.BytesIO()
    np.savez_compressed(buf, images=batch)
    return buf.getvalue()


def load_uint8_batches(store: Path) -> dict[int, np.ndarray]:
    """Seed -> uint8 image from every file of the store; a file whose length does not match its name is skipped."""
    images: dict[int, np.ndarray] = {}
    for path, seeds in seed_batch_files(store, ".npz"):
        with np.load(path) as data:
            batch = data["images"]
        if len(batch) == len(seeds):
            images.update(zip(seeds, batch, strict=True))
        else:
            print(f"{path}: {len(batch)} images for seeds {seeds[0]}..{seeds[-1]}, skipped", file=sys.stderr)
    return images


def render(results: dict[str, dict]) -> str:
    rows = list(results.values())
    samplers = list(SAMPLERS)  # every planned column, "not run" where empty
    # fake (the simulation) first, then by name: a set's order changes with the interpreter's string hashing
    backends = sorted({r["backend"] for r in rows if r["precision"] != "fp32"},
                      key=lambda b: (b != "fake", b)) or ["fake"]
    n_values = sorted({r["n"] for r in rows})
    lines = [
        "# PTQ4DM on the built-in Fashion-MNIST model",
        "",
        "Tables generated by `bench/quality.py` (the reading at the end is written by hand). Every planned row: "
        "`python bench/quality.py --samplers ddim25,ddim100,ddpm1000`; `--only` picks rows by label, `--render` "
        f"rewrites this file from the stored rows. Rows accumulate in `{RESULTS_JSON}` (committed; rows up to "
        "2026-11-25 were rebuilt from this file's own tables, so they carry its rounding) and an interrupted run "
        "resumes from its finished sample batches.",
        "",
        f"FD: Frechet distance between N={', '.join(map(str, n_values))} generated images (seeds 0..N-1, the same "
        "for every row) and the 10,000 test images, in the penultimate features of the project's Fashion-MNIST "
        "classifier (91.2% test accuracy). It stands in for FID: Inception weights cannot be downloaded here. "
        "Real-vs-real floor at N=2000: 0.084 (`ptq4dm eval-fd --real --n 2000`). PSNR (dB, capped at 100) and "
        "SSIM: each quantized image against the FP image of the same seed, averaged. Lower FD is better.",
        "",
        "Calibration: 1024 samples (the default CalibrationConfig) on FP trajectories of the sampler the column "
        "evaluates (NDTC draws its time-steps over that sampler's steps), except DDPM-1000 columns, which use "
        "DDIM-100 trajectories (the default; 1000-step trajectories cost too much here); grid search of 100 "
        "clipping candidates minimising mean |x - q(x)|^2.4; per-channel weights, "
        "per-tensor activations; first/last layer at 8 bits. Backends: `fake` = simulated quantization (fp32 "
        "arithmetic on the integer grid), `int8-x86` = real int8 oneDNN kernels driven by the same scales.",
        "",
    ]
    for table, (title, compared) in TABLES.items():
        own = [v.label for v in variants() if v.table == table]
        labels = [v.label for v in variants() if v.table == table or v.label in compared]
        columns = [(s, b) for s in samplers for b in backends
                   if any(f"{s}|{label}|{b}" in results for label in own)
                   or (table == "main" and b == PRIMARY_BACKEND)]  # the main table shows its gaps as "not run"
        if not columns:
            continue
        head = ["variant"] + [f"{s} {b}: FD / PSNR / SSIM" for s, b in columns]
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in labels:
            cells = [label]
            for s, b in columns:
                r = results.get(f"{s}|{label}|{b}") or results.get(f"{s}|{label}|eager")
                note = ""
                if r is None and label not in own:  # a compared row from the backend it was run on
                    r, note = results.get(f"{s}|{label}|{PRIMARY_BACKEND}"), f" ({PRIMARY_BACKEND})"
                if r is not None:
                    note += same_unets_note(r)
                if r is None:
                    cells.append("not run")
                elif r["precision"] == "fp32":
                    cells.append(f"{r['fd']:.2f}")
                else:
                    cells.append(f"{r['fd']:.2f} / {r['psnr']:.1f} / {r['ssim']:.3f}{note}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + render_worst(results))


def render_worst(results: dict[str, dict]) -> list[str]:
    """FD as a share of FP's and the worst images, for the rows that stored them (the quality issue's targets:
    FD within +10% (W8A8) / +50% (W4A8) of FP, no diverging seed)."""
    rows = [r for r in results.values() if "psnr_min" in r]
    if not rows:
        return []
    lines = ["## Against the targets: FD relative to FP and the worst images", "",
             "| variant | column | backend | FD | FD vs FP | mean PSNR | 1st percentile PSNR | worst PSNR |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["label"], list(SAMPLERS).index(r["sampler"]))):
        fp = results.get(f"{r['sampler']}|fp32|eager")
        share = f"{100 * (r['fd'] / fp['fd'] - 1):+.1f}%" if fp else "-"
        lines.append(f"| {r['label']}{same_unets_note(r)} | {r['sampler']} | {r['backend']} | {r['fd']:.2f} | "
                     f"{share} | {r['psnr']:.1f} | {r['psnr_p1']:.1f} | {r['psnr_min']:.1f} |")
    return lines + [""]


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.values() if r["table"] == "main"]
    labels = [v.label for v in variants() if v.table == "main" and v.precision != "fp32"]  # one fixed x order
    samplers = [s for s in SAMPLERS if any(r["sampler"] == s and r["precision"] != "fp32" for r in rows)]
    fig, axes = plt.subplots(1, len(samplers), figsize=(6 * len(samplers), 4), squeeze=False)
    for ax, s in zip(axes[0], samplers, strict=True):
        sub = [r for r in rows if r["sampler"] == s]
        fp = next((r["fd"] for r in sub if r["precision"] == "fp32"), None)
        for b, marker in (("fake", "o"), ("int8-x86", "s")):
            pts = [r for r in sub if r["backend"] == b]
            ax.scatter([labels.index(r["label"]) for r in pts], [r["fd"] for r in pts], marker=marker, label=b)
        ax.set_xticks(range(len(labels)), labels)
        if fp is not None:
            ax.axhline(fp, color="gray", ls="--", label="fp32")
        ax.set_title(f"FD by calibration method, {s}")
        ax.set_ylabel("FD (lower is better)")
        ax.tick_params(axis="x", rotation=60)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", default="ddim25", help=f"comma list of {', '.join(SAMPLERS)}")
    parser.add_argument("--backends", default="fake,int8-x86", help="quantized rows run on each of these")
    parser.add_argument("--only", default="*", help="comma list of fnmatch patterns on variant labels")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=250, help="images per saved (resumable) batch")
    parser.add_argument("--forward-batch", type=int, default=64, help="images per UNet pass")
    parser.add_argument("--samples-dir", default="runs/samples")
    parser.add_argument("--references-dir", default=str(REFERENCES), help="committed uint8 FP images for PSNR/SSIM")
    parser.add_argument("--results", default=str(RESULTS_JSON),
                        help="where rows are stored; a side check (another --n) keeps its rows out of the report's")
    parser.add_argument("--render", action="store_true", help="only rewrite the report from the stored rows")
    parser.add_argument("--out", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    store = Path(args.results)
    if not args.render:
        # Row keys do not hold N: rows of another N in one store would be skipped as done or sit among them.
        other_n = sorted({row["n"] for row in load_results(store).values()} - {args.n})
        if other_n:
            parser.error(f"--n {args.n} differs from the N={other_n} of the rows in {store}: pass another --results")
        evaluator = Evaluator(args.n, args.batch_size, Path(args.samples_dir), args.forward_batch,
                              Path(args.references_dir))
        for s in args.samplers.split(","):
            sampler, steps = SAMPLERS[s]
            for variant in variants():
                if not any(fnmatch.fnmatch(variant.label, pat) for pat in args.only.split(",")):
                    continue
                for backend in (["eager"] if variant.precision == "fp32" else args.backends.split(",")):
                    key = f"{s}|{variant.label}|{backend}"
                    results = load_results(store)
                    if key in results:
                        continue
                    row = (same_unets_row(results, variant, backend, s)
                           or evaluator.row(variant, backend, sampler, steps))
                    save_result(key, row, store)
                    print(json.dumps(row), flush=True)
    results = load_results(store)
    out = Path(args.out)
    reading = ""  # the hand-written part below READING_MARKER survives regeneration
    if out.exists() and READING_MARKER in out.read_text():
        reading = READING_MARKER + out.read_text().split(READING_MARKER, 1)[1]
    out.write_text(render(results) + "\n" + reading)
    try:
        plot(results, Path(args.out).with_name("results_fd.png"))
    except ImportError:
        print("matplotlib missing (pip install -e .[docs]): plot skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
