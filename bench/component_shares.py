"""Share of a text-to-image image's time in the text encoder and the VAE decoder, which PTQ4DM leaves unquantized.

Why: only the UNet is quantized, because it runs every step (twice per image with classifier-free guidance); the
CLIP text encoder runs once per prompt and the decoder once per image, in fp32 (or bf16). This measures how much
of an image that leaves outside quantization's reach, on Stable Diffusion 1.5-shaped components (the configs of
its UNet, CLIP ViT-L/14 text encoder and AutoencoderKL, random weights: nothing is downloaded; the time of a
forward does not depend on the weights' values). Per image: one text-encoder call over the prompt and the negative
prompt (77 tokens each), `steps` UNet passes at batch 2 (uncond + cond, as the service batches CFG), one decode.
Timings interleaved, medians.

    python bench/component_shares.py                       # 512x512, 25 steps
    python bench/component_shares.py --resolution 256 --steps 25,50
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from speed import time_interleaved  # bench/ is the script's directory
from transformers import CLIPTextConfig, CLIPTextModel

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def bf16(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latent side / 8)")
    parser.add_argument("--steps", default="25,50", help="sampler steps to compute shares for")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    side = args.resolution // 8
    with torch.no_grad():
        unet = UNet2DConditionModel(**SD15_UNET).eval()
        vae = AutoencoderKL(**SD15_VAE).eval()
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).eval()
    tokens = torch.randint(0, SD15_TEXT["vocab_size"], (2, 77))
    hidden = torch.randn(2, 77, 768)
    latents = torch.randn(1, 4, side, side)
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "text encoder fp32": lambda: text(tokens).last_hidden_state,
        "text encoder bf16": bf16(lambda: text(tokens).last_hidden_state),
        "UNet fp32 (batch 2)": lambda: unet(latents.expand(2, -1, -1, -1), 500, encoder_hidden_states=hidden).sample,
        "VAE decode fp32": lambda: vae.decode(latents).sample,
        "VAE decode bf16": bf16(lambda: vae.decode(latents).sample),
    }
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        s = time_interleaved(calls, args.repeats)
    print(f"Command: `python bench/component_shares.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
          f"torch {torch.__version__}, {args.threads} threads, {args.resolution}x{args.resolution}, "
          f"{args.repeats} interleaved repeats (medians)\n")
    print("| component | s per call | calls per image |\n|---|---|---|")
    for name, seconds in s.items():
        per_image = "steps" if name.startswith("UNet") else "1"
        print(f"| {name} | {seconds:.3f} | {per_image} |")
    print("\n| steps | UNet s per image (fp32) | text encoder share | VAE share | share at a 2x faster (int8) UNet |")
    print("|---|---|---|---|---|")
    for steps in (int(x) for x in args.steps.split(",")):
        u = steps * s["UNet fp32 (batch 2)"]
        enc, dec = s["text encoder fp32"], s["VAE decode fp32"]
        total, fast = u + enc + dec, u / 2 + enc + dec
        print(f"| {steps} | {u:.1f} | {enc / total:.1%} | {dec / total:.1%} | {enc / fast:.1%} + {dec / fast:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
