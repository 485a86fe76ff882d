"""Fréchet distance between classifier-feature Gaussians (FID's formula on the project's own features)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from quantizer.evaluation.classifier import FashionClassifier


@torch.no_grad()
def extract_features(model: FashionClassifier, x: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """x in model space ([-1, 1], N x 1 x 32 x 32) -> N x FEATURE_DIM float64."""
    model.eval()
    chunks = [model.features(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks).double().numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)); a small ridge keeps sqrtm finite for near-singular covariances."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        ridge = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fd_between(model: FashionClassifier, a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between two image sets in model space."""
    return frechet_distance(*gaussian_stats(extract_features(model, a)), *gaussian_stats(extract_features(model, b)))
