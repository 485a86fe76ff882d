"""Where along the trajectory an error in the noise estimate changes the image: random error of a given size,
added to the FP UNet's output only for time-steps in a range, against the FP images of the same seeds.

Why: quantized W8A8 images that differ from FP are mostly seeds that became another object, not noisy copies
(docs/RESULTS.md). This separates the sampler's sensitivity from the quantizer: no quantization here, only
Gaussian error of relative size `rel` (||e|| = rel * ||eps|| per image, seeded), so the answer says which
time-steps must be computed accurately, and how accurately.

    python bench/perturbation.py                       # DDIM-25 and DDIM-100, 32 seeds, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.models import load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.metrics import capped_psnr

# (relative size, [t_lo, t_hi)) of the injected error; None = every time-step
SETTINGS = ((0.003, None), (0.01, None), (0.02, None), (0.02, (0, 500)), (0.02, (500, 1000)),
            (0.02, (750, 1000)))


class NoisyUNet(nn.Module):
    """The FP UNet whose noise estimate gets seeded random error of relative size `rel` for t in `window`."""

    def __init__(self, unet: nn.Module, rel: float, window: tuple[int, int] | None, seed: int = 0) -> None:
        super().__init__()
        self.unet, self.rel, self.window = unet, rel, window
        self.config, self.device, self.dtype = unet.config, torch.device("cpu"), torch.float32
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: object) -> UNet2DOutput:
        eps = self.unet(x, t, **kwargs).sample
        if self.window is None or self.window[0] <= int(t) < self.window[1]:
            noise = torch.randn(eps.shape, generator=self.generator)
            scale = eps.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1) * self.rel
            eps = eps + noise * scale.view(-1, 1, 1, 1)
        return UNet2DOutput(sample=eps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", default="25,100")
    args = parser.parse_args(argv)
    model = load_model(None)
    seeds = list(range(args.images))
    print(f"Command: `python bench/perturbation.py {shlex.join(sys.argv[1:])}`\n")
    print("| DDIM steps | error size | time-steps | mean PSNR dB | worst PSNR dB | images below 25 dB |")
    print("|---|---|---|---|---|---|", flush=True)
    for steps in map(int, args.steps.split(",")):
        ref = to_uint8(sample(model.unet, model.scheduler_config, seeds, steps=steps))
        for rel, window in SETTINGS:
            out = to_uint8(sample(NoisyUNet(model.unet, rel, window), model.scheduler_config, seeds, steps=steps))
            per_image = capped_psnr(ref, out)
            where = "all" if window is None else f"{window[0]} <= t < {window[1]}"
            print(f"| {steps} | {100 * rel:.1f}% | {where} | {per_image.mean():.1f} | {per_image.min():.1f} | "
                  f"{int((per_image < 25).sum())} of {len(seeds)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
