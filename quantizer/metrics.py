"""Image-fidelity metrics of a quantized model against its full-precision self (same seeds)."""

from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of uint8 N x H x W x C arrays; identical images give +inf."""
    ref = reference.astype(np.float64)
    mse = ((ref - test.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak**2 / mse)
