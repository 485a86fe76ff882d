"""Class accuracy of a training run's latest checkpoint (its EMA weights), without stopping or exporting the run.

Why: a class-conditional fine-tune learns to use its labels gradually (`ptq4dm train --class-conditional`, DDIM-25,
seeds 0..59: 13% at step 500, 23% at 750, 32% at 1000, 47% at 1250), so whether it is done is read off this number
rather than the loss, which the label barely moves. 60 DDIM-25 images take about a minute beside the training.

    python bench/checkpoint_class_accuracy.py [--run runs/fashion-mnist-ddpm-cond] [--n 60] [--steps 25]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from quantizer.diffusion.sampling import sample
from quantizer.evaluation.class_accuracy import balanced_labels, class_accuracy
from quantizer.evaluation.classifier import load_classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/fashion-mnist-ddpm-cond")
    parser.add_argument("--n", type=int, default=60, help="images, seeds 0..n-1, label seed %% classes")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    args = parser.parse_args(argv)
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())  # the effective UNet/scheduler configs (train.py)
    state = torch.load(run / "state.pt", weights_only=False)
    unet = UNet2DModel.from_config(config["unet"])
    classes = unet.config.num_class_embeds
    if classes is None:
        parser.error(f"{run} trains an unconditional model")
    ema = EMAModel(unet.parameters())
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    seeds = list(range(args.n))
    labels = balanced_labels(seeds, classes)
    with torch.no_grad():
        samples = sample(unet.eval(), config["scheduler"], seeds, steps=args.steps, class_labels=labels)
    result = class_accuracy(load_classifier(), samples, labels, classes)
    print(json.dumps({"run": str(run), "step": state["step"], "n": args.n, "ddim_steps": args.steps,
                      **result.as_dict()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
