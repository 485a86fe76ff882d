"""Model-space tensors to uint8 arrays, PNG bytes and grids (Pillow)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


class NonFiniteImageError(ValueError):
    """A generated image holds NaN/inf: the model diverged. Clipping would turn it into a black PNG."""

    def __init__(self, indices: list[int], total: int) -> None:
        self.indices = indices
        super().__init__(f"{len(indices)} of {total} generated images hold non-finite values (NaN/inf), "
                         f"images {indices[:8]}{'...' if len(indices) > 8 else ''}: the model diverged")


def non_finite_images(samples: torch.Tensor) -> list[int]:
    """Indices of the images (along dim 0) with any NaN/inf value."""
    bad = ~torch.isfinite(samples.detach().flatten(1)).all(1)
    return bad.nonzero().flatten().tolist()


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """N x C x H x W in [-1, 1] -> N x H x W x C uint8 (rounded, clipped); NonFiniteImageError on NaN/inf."""
    bad = non_finite_images(samples)
    if bad:
        raise NonFiniteImageError(bad, len(samples))
    x = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    """H x W x C uint8 -> PIL image (mode L for one channel, RGB for three)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """Tile N x H x W x C images into one H' x W' x C array, row-major, `nrow` per row."""
    n, h, w, c = images.shape
    rows = (n + nrow - 1) // nrow
    out = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y: y + h, x: x + w] = images[k]
    return out
