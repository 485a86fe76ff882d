"""Image-fidelity metrics of a quantized model against its full-precision self (same seeds)."""

from __future__ import annotations

import numpy as np


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Per-image PSNR in dB of uint8 N x H x W x C arrays; identical images give +inf."""
    ref = reference.astype(np.float64)
    mse = ((ref - test.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak**2 / mse)


def capped_psnr(reference: np.ndarray, test: np.ndarray, cap: float = 100.0) -> np.ndarray:
    """Per-image PSNR capped at `cap` dB, so identical images (+inf) can be averaged and ranked with the rest."""
    return np.minimum(psnr(reference, test), cap)


def mean_psnr(reference: np.ndarray, test: np.ndarray, cap: float = 100.0) -> float:
    """Mean per-image PSNR, each image capped at `cap` dB: one identical image would make the mean +inf."""
    return float(np.mean(capped_psnr(reference, test, cap)))


def ssim(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Per-image mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid region)
    of uint8 N x H x W x C arrays; channels are averaged. 1.0 for identical images."""
    import torch
    import torch.nn.functional as F

    def nchw(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a.astype(np.float64)).permute(0, 3, 1, 2)
        return t.reshape(-1, 1, *t.shape[2:])  # every channel its own image

    x, y = nchw(reference), nchw(test)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    per_channel = s.mean(dim=(1, 2, 3)).reshape(len(reference), -1)
    return per_channel.mean(dim=1).numpy()
