"""Latent diffusion's last step: decode the sampled latents to pixels with the pipeline's VAE, in full precision.

Only the UNet is quantized (it runs every step); the decoder runs once per image, so it stays fp32 eager and its
output is what an unquantized pipeline would show for the same latents.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

# The classes quantizer.diffusion.kinds.DECODER_CLASSES names (kinds is torch-free, so it holds names only).
DECODERS: dict[str, type[nn.Module]] = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}


def decoder_class(name: str) -> type[nn.Module]:
    """The diffusers class of a decoder named in model_index.json; ValueError for one that is not supported."""
    try:
        return DECODERS[name]
    except KeyError:
        raise ValueError(f"model: latent decoder {name} is not supported; use one of {', '.join(DECODERS)}") from None


def upsampling(decoder: nn.Module) -> int:
    """Pixels per latent along each side: one downsampling per encoder block but the last (diffusers' VAEs)."""
    return 2 ** (len(decoder.config.block_out_channels) - 1)


@torch.no_grad()
def decode_latents(decoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """N x C x h x w latents -> N x 3 x H x W pixels in model space ([-1, 1], float32 on CPU, not clipped).

    As diffusers' pipelines do: divide by the VAE's scaling_factor (and add its shift_factor where it has one),
    then decode; a VQModel's decode snaps the latents to its codebook first (LDMPipeline's default). Every op works
    per image, so image k still depends only on its own latent.
    """
    param = next(decoder.parameters())
    z = latents.to(param.device, param.dtype) / float(decoder.config.scaling_factor)
    shift = getattr(decoder.config, "shift_factor", None)
    if shift is not None:
        z = z + float(shift)
    return decoder.decode(z).sample.float().cpu()
