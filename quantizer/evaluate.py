"""FD evaluation of a model's samples against the Fashion-MNIST test split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from quantizer.classifier import load_classifier
from quantizer.data import FASHION_MNIST_CLASSES, fashion_mnist_tensor
from quantizer.fd import extract_features, frechet_distance, gaussian_stats
from quantizer.models import load_model
from quantizer.sampling import sample


def reference_stats(classifier: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Feature Gaussian of the full 10,000-image test split (the FID convention: fixed real statistics)."""
    x, _ = fashion_mnist_tensor("test")
    return gaussian_stats(extract_features(classifier, x))


def generate_in_batches(unet: torch.nn.Module, scheduler_config: dict, seeds: list[int], sampler: str, steps: int,
                        batch_size: int, eta: float = 0.0) -> torch.Tensor:
    """Like `sample`, with one progress bar over every denoising step of every batch."""
    total = -(-len(seeds) // batch_size) * steps
    with tqdm(total=total, desc=f"{sampler}-{steps} x{len(seeds)}", unit="step") as bar:
        return sample(unet, scheduler_config, seeds, sampler=sampler, steps=steps, eta=eta,
                      batch_size=batch_size, callback=lambda *_: bar.update(1))


def evaluate_fd_real(n: int = 2000, seed: int = 0, classifier: str | Path | None = None) -> dict:
    """FD of n real training images vs the test split: the floor a perfect generator would reach at this n."""
    clf = load_classifier(classifier)
    x, _ = fashion_mnist_tensor("train")
    subset = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]
    fd = frechet_distance(*gaussian_stats(extract_features(clf, subset)), *reference_stats(clf))
    return {"model": "real Fashion-MNIST train images", "n": n, "seed": seed, "fd": round(fd, 3)}


def evaluate_fd(model: str | None, sampler: str = "ddim", steps: int = 100, n: int = 2000, seed: int = 0,
                batch_size: int = 250, classifier: str | Path | None = None) -> dict:
    """Sample n images (seeds seed..seed+n-1), return FD vs the test split and the predicted-class histogram."""
    clf = load_classifier(classifier)
    mu_ref, sigma_ref = reference_stats(clf)
    diffusion = load_model(model)
    start = time.time()
    samples = generate_in_batches(diffusion.unet, diffusion.scheduler_config, list(range(seed, seed + n)),
                                  sampler, steps, batch_size)
    wall = time.time() - start
    feats = extract_features(clf, samples)
    with torch.no_grad():
        predicted = torch.cat([clf(samples[i:i + 500]).argmax(1) for i in range(0, n, 500)])
    counts = torch.bincount(predicted, minlength=10).tolist()
    return {
        "model": diffusion.name, "sampler": sampler, "steps": steps, "n": n, "seeds": f"{seed}..{seed + n - 1}",
        "fd": round(frechet_distance(*gaussian_stats(feats), mu_ref, sigma_ref), 3),
        "class_histogram": dict(zip(FASHION_MNIST_CLASSES, counts, strict=True)),
        "sampling_wall_s": round(wall, 1),
    }
