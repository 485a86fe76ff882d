"""Where the quantization error enters: PTQ4DM's layers one at a time, on the built-in model.

Why: W8A8 images are not the FP images (docs/RESULTS.md); before adding machinery (time-step-aware scales, concat
splitting, mixed precision, reconstruction) the numbers should say which layers and which tensors (weights or
activations) the error comes from, and whether it depends on the time-step.

For each quantized layer L of the default PTQ4DM calibration (`quantize_model(model, precision)`: the shipped
W8A8 statistics for the built-in model) and each of
  * `weights`     only L's weights quantized, everything else float;
  * `activations` only L's input quantized;
  * `all but`     the whole quantized model except L (L float): what keeping L in float would win;
it measures
  * one-forward relative error ||eps_q - eps_fp|| / ||eps_fp|| on held-out pairs (x_t, t) from the FP model's
    own DDIM-100 trajectories (uniform over the trajectory, seeds disjoint from the calibration's), overall and per
    quarter of the time-step range; and
  * end-to-end PSNR of DDIM-100 images (seeds 0..n-1) against the FP images of the same seeds.
It also records each layer input's range over the FP trajectories per sampler step, against the clipping range
PTQ4DM calibrated for it (the paper's core observation: activation ranges move with the time-step), and plots it.

Results accumulate in runs/sensitivity/<precision>.json (an interrupted run resumes); the report is rendered to
docs/SENSITIVITY.md and docs/sensitivity.png.

    python bench/sensitivity.py --images 8                      # W8A8: ~40 min on 2 cores
    python bench/sensitivity.py --kinds activations             # a subset
    python bench/sensitivity.py --render                        # rewrite the report from the stored results
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.metrics import capped_psnr
from quantizer.ptq.calibration import CalibrationSet, build_calibration_set, sampler_timesteps
from quantizer.ptq.config import CalibrationConfig
from quantizer.ptq.pipeline import quantize_model
from quantizer.ptq.quant_modules import QuantLayer

KINDS = ("weights", "activations", "all but")
RUNS = Path("runs/sensitivity")
T_QUARTERS = 4
HELD_OUT_SEED = 20261202  # the calibration uses seed 0
READING_MARKER = "<!-- reading: written by hand, kept by bench/sensitivity.py --render -->"


# -- which tensors are quantized -----------------------------------------------------------------------------------

def configure(layers: dict[str, QuantLayer], weights: Iterable[str], activations: Iterable[str]) -> None:
    """Quantize exactly these layers' weights and these layers' inputs; everything else runs in float."""
    weights, activations = set(weights), set(activations)
    for name, layer in layers.items():
        layer.set_mode("quant" if name in weights else "fp")
        layer.input_quantizer.mode = "quant" if name in activations else "fp"


def setting(layers: dict[str, QuantLayer], layer: str | None, kind: str) -> tuple[set[str], set[str]]:
    """(quantized weights, quantized inputs) of one measurement; layer None = the whole model in `kind`."""
    every = set(layers)
    if layer is None:
        return ({"weights": every, "activations": set(), "all": every}[kind],
                {"weights": set(), "activations": every, "all": every}[kind])
    return {"weights": ({layer}, set()), "activations": (set(), {layer}),
            "all but": (every - {layer}, every - {layer})}[kind]


# -- measurements --------------------------------------------------------------------------------------------------

@torch.no_grad()
def eps(unet: torch.nn.Module, pairs: CalibrationSet, batch: int = 64) -> torch.Tensor:
    return torch.cat([unet(pairs.xs[i:i + batch], pairs.ts[i:i + batch]).sample
                      for i in range(0, len(pairs.xs), batch)])


def one_forward_errors(out: torch.Tensor, ref: torch.Tensor, ts: torch.Tensor, num_train: int) -> dict[str, Any]:
    """Mean per-pair relative error, overall and per quarter of [0, num_train) (quarter 0 is the x_0 end)."""
    per_pair = ((out - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)).numpy()
    quarter = np.minimum(ts.numpy() * T_QUARTERS // num_train, T_QUARTERS - 1)
    return {"rel_error": float(per_pair.mean()),
            "rel_error_by_quarter": [float(per_pair[quarter == q].mean()) if (quarter == q).any() else None
                                     for q in range(T_QUARTERS)]}


def images(unet: torch.nn.Module, model: DiffusionModel, n: int) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(sample(unet, model.scheduler_config, list(range(n)), sampler="ddim", steps=100))


@torch.no_grad()
def input_ranges(model: DiffusionModel, unet: torch.nn.Module, layers: dict[str, QuantLayer],
                 n: int) -> dict[str, Any]:
    """Per layer input: min and max over n FP DDIM-100 trajectories (one batch) at each sampler step."""
    configure(layers, (), ())
    ranges: dict[str, list[list[float]]] = {name: [] for name in layers}
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, name=name: ranges[name].append([float(args[0].min()), float(args[0].max())]))
        for name, layer in layers.items()]
    try:
        images(unet, model, n)
    finally:
        for hook in hooks:
            hook.remove()
    clip = {}
    for name, layer in layers.items():
        q = layer.input_quantizer
        scale, zp = float(q.scale), float(q.zero_point)
        clip[name] = [(q.qrange.qmin - zp) * scale, (q.qrange.qmax - zp) * scale]
    return {"timesteps": sampler_timesteps(model.scheduler_config, "ddim", 100).tolist(), "ranges": ranges,
            "clip": clip}


# -- the run -------------------------------------------------------------------------------------------------------

class Results:
    """runs/sensitivity/<precision>.json: every measurement stored as soon as it is made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get_or(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)
        return self.data[key]


def run(precision: str, n_images: int, n_pairs: int, kinds: list[str], psnr_kinds: set[str],
        cache_dir: str) -> Results:
    model = load_model(None)
    q = quantize_model(model, precision, cache_dir=cache_dir, progress=False)
    unet = q.unet
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, QuantLayer)}
    results = Results(RUNS / f"{precision}.json")
    results.get_or("meta", lambda: {"command": shlex.join(["python", "bench/sensitivity.py", *sys.argv[1:]]),
                                    "precision": precision, "stats_source": q.stats_source,
                                    "calibration_hash": q.calibration_hash, "layers": list(layers),
                                    "n_pairs": n_pairs})
    num_train = int(model.scheduler_config["num_train_timesteps"])
    pairs = build_calibration_set(model.unet, model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=n_pairs, seed=HELD_OUT_SEED,
                                                    batch_size=64), progress=False)
    ref_eps = eps(model.unet, pairs)
    ref_images = images(model.unet, model, n_images)

    def measure(weights: set[str], activations: set[str], with_psnr: bool) -> dict[str, Any]:
        configure(layers, weights, activations)
        row = one_forward_errors(eps(unet, pairs), ref_eps, pairs.ts, num_train)
        if with_psnr:  # the expensive part: n_images DDIM-100 generations
            per_image = capped_psnr(ref_images, images(unet, model, n_images))
            row.update(psnr=float(per_image.mean()), psnr_per_image=per_image.round(2).tolist(), n_images=n_images)
        return row

    for kind in ("all", "weights", "activations"):
        results.get_or(f"whole/{kind}@{n_images}", lambda kind=kind: measure(*setting(layers, None, kind), True))
    results.get_or("input_ranges", lambda: input_ranges(model, unet, layers, min(n_images, 8)))
    started = time.monotonic()
    todo = [(kind, name) for kind in kinds for name in layers]
    for i, (kind, name) in enumerate(todo, 1):
        with_psnr = kind in psnr_kinds
        results.get_or(f"layer/{kind}/{name}" + (f"@{n_images}" if with_psnr else ""),
                       lambda kind=kind, name=name, p=with_psnr: measure(*setting(layers, name, kind), p))
        print(f"[{i}/{len(todo)}] {kind} {name} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    return results


# -- the report ----------------------------------------------------------------------------------------------------

def _flops_share(model: DiffusionModel) -> dict[str, float]:
    """Each Conv2d/Linear's share of the multiply-accumulates of one forward (from its output size)."""
    macs: dict[str, float] = {}
    hooks = []
    for name, module in model.unet.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, _i, out, name=name: macs.__setitem__(
                    name, out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])))
        elif isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, _i, out, name=name: macs.__setitem__(name, out.numel() * m.in_features)))
    shape = (1, model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    with torch.no_grad():
        model.unet(torch.zeros(shape), torch.tensor(500))
    for hook in hooks:
        hook.remove()
    total = sum(macs.values())
    return {name: value / total for name, value in macs.items()}


def plot(data: dict[str, Any], names: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranges = data["input_ranges"]
    steps = ranges["timesteps"]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(4 * ((len(names) + 1) // 2), 6.5), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        # One pre-hook call per UNet pass, and a pass covers every image of the batch at one sampler step.
        per_step = np.array(ranges["ranges"][name]).reshape(len(steps), -1, 2)
        lo, hi = per_step[:, :, 0].min(axis=1), per_step[:, :, 1].max(axis=1)
        ax.fill_between(steps, lo, hi, alpha=0.35, label="input range (FP, per step)")
        c_lo, c_hi = ranges["clip"][name]
        ax.axhline(c_lo, color="k", lw=0.8, ls="--")
        ax.axhline(c_hi, color="k", lw=0.8, ls="--", label="PTQ4DM clipping range")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("time-step t (1000 = noise)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def render(precision: str, out_md: Path, out_png: Path) -> str:
    data = json.loads((RUNS / f"{precision}.json").read_text())
    meta = data["meta"]
    layers = meta["layers"]
    share = _flops_share(load_model(None))
    n_images = max(int(k.rsplit("@", 1)[1]) for k in data if k.startswith("whole/all@"))
    whole = {k: data[f"whole/{k}@{n_images}"] for k in ("all", "weights", "activations")}

    def row(key: str) -> dict[str, Any] | None:
        return data.get(key) or data.get(f"{key}@{n_images}")

    lines = [
        f"## Where the {precision.upper()} error enters (`bench/sensitivity.py`)",
        "",
        f"Command: `{meta.get('command', 'python bench/sensitivity.py')}`. Built-in model, PTQ4DM "
        f"{precision.upper()} with the default NDTC calibration (stats: {meta['stats_source']}, "
        f"{meta['calibration_hash'][:12]}), fake quant. One-forward error: mean ||eps_q - eps_fp|| / ||eps_fp|| "
        f"over {meta['n_pairs']} held-out (x_t, t) pairs from FP DDIM-100 trajectories (uniform over the "
        f"trajectory), per quarter of t (Q1 = t < 250, the x_0 end). PSNR: DDIM-100, seeds 0..{n_images - 1}, "
        "against the FP images (capped at 100 dB per image).",
        "",
        "| quantized | rel. error | Q1 | Q2 | Q3 | Q4 | PSNR dB | worst image dB |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cells(r: dict[str, Any]) -> str:
        q = " | ".join("-" if v is None else f"{v:.4f}" for v in r["rel_error_by_quarter"])
        if "psnr" not in r:
            return f"{r['rel_error']:.4f} | {q} | - | -"
        return f"{r['rel_error']:.4f} | {q} | {r['psnr']:.1f} | {min(r['psnr_per_image']):.1f}"

    for kind, label in (("all", "everything (W8A8 as served)"), ("weights", "all weights only"),
                        ("activations", "all activations only")):
        lines.append(f"| {label} | {cells(whole[kind])} |")
    for kind, title, key in (
            ("activations", "Only one layer's input quantized: the 15 largest one-forward errors", "rel_error"),
            ("weights", "Only one layer's weights quantized: the 15 largest one-forward errors", "rel_error"),
            ("all but", "Everything quantized but one layer: the 15 layers whose float copy wins most PSNR",
             "psnr")):
        rows = [(name, r) for name in layers if (r := row(f"layer/{kind}/{name}")) is not None]
        if not rows:
            continue
        rows.sort(key=lambda nr: nr[1].get(key, nr[1]["rel_error"]), reverse=True)
        lines += ["", f"### {title}", "", f"({len(rows)} of {len(layers)} layers measured.)", "",
                  "| layer | MAC share | rel. error | Q1 | Q2 | Q3 | Q4 | PSNR dB | worst image dB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows[:15]:
            lines.append(f"| `{name}` | {share.get(name, 0):.1%} | {cells(r)} |")
    ranked = sorted(layers, key=lambda n: (row(f"layer/activations/{n}") or {"rel_error": 0})["rel_error"],
                    reverse=True)[:6]
    if "input_ranges" in data:
        plot(data, ranked, out_png)
        lines += ["", f"![input ranges per time-step]({out_png.name})", "",
                  "The six layers whose quantized input adds the most one-forward error: each input's range over "
                  "FP DDIM-100 trajectories at every sampler step (shaded) against the one clipping range PTQ4DM "
                  "calibrated for it (dashed)."]
    text = "\n".join(lines) + "\n"
    kept = out_md.read_text().split(READING_MARKER, 1) if out_md.exists() else []
    text = "# Sensitivity\n\n" + text + "\n" + READING_MARKER + (kept[1] if len(kept) == 2 else "\n")
    out_md.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="w8a8")
    parser.add_argument("--images", type=int, default=16, help="DDIM-100 images per end-to-end measurement")
    parser.add_argument("--pairs", type=int, default=256, help="held-out (x_t, t) pairs per one-forward error")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--psnr-kinds", default="all but",
                        help="kinds whose rows also get the end-to-end PSNR (DDIM-100 generations: the slow part)")
    parser.add_argument("--cache-dir", default="runs/calibration-cache")
    parser.add_argument("--render", action="store_true", help="only rewrite the report from stored results")
    parser.add_argument("--out", default="docs/SENSITIVITY.md")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if unknown := sorted(set(kinds) - set(KINDS)):
        parser.error(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if not args.render:
        psnr_kinds = {k.strip() for k in args.psnr_kinds.split(",") if k.strip()}
        run(args.precision, args.images, args.pairs, kinds, psnr_kinds, args.cache_dir)
    out = Path(args.out)
    print(render(args.precision, out, out.with_name("sensitivity.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
