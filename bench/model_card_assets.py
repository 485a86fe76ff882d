"""Regenerate a built-in model card's figures: the loss curve and a 10x10 DDIM-100 sample grid.

Unconditional: seeds 0..99. Class-conditional: row c is class c, column s seed s, so each column shows what
the label alone changes in the image drawn from the same noise.

    python bench/model_card_assets.py [--run runs/fashion-mnist-ddpm] [--model models/fashion-mnist-ddpm]
    python bench/model_card_assets.py --run runs/fashion-mnist-ddpm-cond --model models/fashion-mnist-ddpm-cond
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quantizer.diffusion.images import grid, png_bytes, to_uint8  # noqa: E402
from quantizer.diffusion.models import load_model  # noqa: E402
from quantizer.evaluation.evaluate import generate_in_batches  # noqa: E402


def plot_loss(log: Path, out: Path, title: str) -> None:
    steps, losses = [], []
    with open(log) as fh:
        for row in csv.DictReader(fh):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(steps, losses, lw=1)
    ax.set(xlabel="step (batch 64)", ylabel="noise MSE (EMA 0.98)", yscale="log",
           title=f"{title} training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default="runs/fashion-mnist-ddpm")
    parser.add_argument("--model", default="models/fashion-mnist-ddpm")
    args = parser.parse_args()
    model_dir = Path(args.model)
    if (Path(args.run) / "loss.csv").exists():
        plot_loss(Path(args.run) / "loss.csv", model_dir / "loss.png", model_dir.name)
    model = load_model(model_dir)
    if model.num_classes is None:
        seeds, labels = list(range(100)), None
    else:
        seeds = [s for _ in range(model.num_classes) for s in range(10)]
        labels = [c for c in range(model.num_classes) for _ in range(10)]
    samples = generate_in_batches(model.unet, model.scheduler_config, seeds, "ddim", 100, batch_size=100,
                                  class_labels=labels)
    (model_dir / "samples_ddim100.png").write_bytes(png_bytes(grid(to_uint8(samples), nrow=10)))


if __name__ == "__main__":
    main()
