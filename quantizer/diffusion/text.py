"""Prompts -> the UNet's encoder_hidden_states for text-to-image models, and classifier-free guidance's inputs.

The CLIP text encoder runs once per image in full precision (never quantized): like the decoder, its cost is per
image, not per step. Each prompt is padded to the tokenizer's full length and encoded on its own row, so image k's
conditioning depends only on its own prompt, whatever batch it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantizer.diffusion.prompts import DEFAULT_GUIDANCE_SCALE


@dataclass
class TextConditioning:
    """Per image: its prompt's embedding (cond), its negative prompt's (uncond) and its guidance scale.

    The UNet sees both halves in one pass of 2N ([uncond; cond]); eps = uncond + g * (cond - uncond).
    """

    cond: torch.Tensor  # N x L x D
    uncond: torch.Tensor  # N x L x D
    guidance: torch.Tensor  # N, float32

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def select(self, rows: slice | torch.Tensor | Sequence[int]) -> TextConditioning:
        return TextConditioning(self.cond[rows], self.uncond[rows], self.guidance[rows])

    def unet_inputs(self) -> torch.Tensor:
        """encoder_hidden_states of the 2N pass: every image's negative, then every image's prompt."""
        return torch.cat([self.uncond, self.cond])

    def guide(self, eps: torch.Tensor) -> torch.Tensor:
        """The 2N pass's output -> each image's guided noise prediction."""
        uncond, cond = eps.chunk(2)
        g = self.guidance.to(eps.dtype).view(-1, *([1] * (eps.ndim - 1)))
        return uncond + g * (cond - uncond)


class PromptEncoder(nn.Module):
    """A CLIP tokenizer and text encoder, as StableDiffusionPipeline uses them (last hidden state, no mask)."""

    def __init__(self, tokenizer: object, text_encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, source: str | Path, variant: str | None = None) -> PromptEncoder:
        from transformers import CLIPTextModel, CLIPTokenizer  # only text-to-image models need transformers

        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant)
        return cls(tokenizer, encoder)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """N prompts -> N x L x D embeddings (float32, CPU); longer prompts are truncated to the tokenizer's limit."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0].float().cpu()

    def condition(self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None,
                  guidance_scales: Sequence[float | None] | None = None) -> TextConditioning:
        """The conditioning of N images; a missing negative prompt is '' and a missing scale the default."""
        n = len(prompts)
        negatives = [p or "" for p in (negative_prompts or [None] * n)]
        scales = [DEFAULT_GUIDANCE_SCALE if g is None else float(g) for g in (guidance_scales or [None] * n)]
        if len(negatives) != n or len(scales) != n:
            raise ValueError(f"negative_prompts and guidance_scales must hold one entry per prompt ({n})")
        both = self(list(prompts) + negatives)
        return TextConditioning(both[:n], both[n:], torch.tensor(scales, dtype=torch.float32))
