from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from quantizer.diffusion.images import grid, png_bytes, to_uint8


def test_to_uint8_maps_range_endpoints():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]


def test_png_roundtrip_gray_and_rgb():
    rng = np.random.default_rng(0)
    for c, mode in ((1, "L"), (3, "RGB")):
        img = rng.integers(0, 256, (12, 10, c), dtype=np.uint8)
        decoded = Image.open(io.BytesIO(png_bytes(img)))
        assert decoded.mode == mode and decoded.size == (10, 12)
        assert np.array_equal(np.asarray(decoded).reshape(12, 10, c), img)


def test_grid_places_tiles_row_major():
    tiles = np.stack([np.full((4, 4, 1), k, dtype=np.uint8) for k in range(1, 6)])
    g = grid(tiles, nrow=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 1)
    assert g[1, 1, 0] == 1 and g[1, 6, 0] == 2 and g[6, 1, 0] == 4 and g[6, 6, 0] == 5
    assert g[6, 11, 0] == 0  # the empty sixth slot stays background
