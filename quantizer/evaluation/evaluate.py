"""FD evaluation of a model's samples against the Fashion-MNIST test split."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import sample
from quantizer.evaluation.classifier import load_classifier
from quantizer.evaluation.data import FASHION_MNIST_CLASSES, fashion_mnist_tensor
from quantizer.evaluation.fd import extract_features, frechet_distance, gaussian_stats
from quantizer.ptq.cache import atomic_write, hash_state_dict


def reference_stats(classifier: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Feature Gaussian of the full 10,000-image test split (the FID convention: fixed real statistics)."""
    x, _ = fashion_mnist_tensor("test")
    return gaussian_stats(extract_features(classifier, x))


def generate_in_batches(unet: torch.nn.Module, scheduler_config: dict, seeds: list[int], sampler: str, steps: int,
                        batch_size: int, eta: float = 0.0, cache_dir: str | Path | None = None,
                        forward_batch: int | None = None,
                        on_cached: Callable[[Sequence[int]], None] | None = None,
                        class_labels: Sequence[int | None] | None = None,
                        decoder: torch.nn.Module | None = None) -> torch.Tensor:
    """Like `sample`, with one progress bar over every denoising step of every batch.

    With `cache_dir`, each finished batch is saved there (one safetensors file per seed range) and reused on the
    next call: a DDPM-1000 evaluation that outlives a session resumes at the batch it was in, whatever batch size
    either call used. The caller keys the directory by everything the samples depend on (weights, precision,
    sampler, steps, eta); per-image seeds make a batch's images independent of how the rest was batched.
    forward_batch (default batch_size) splits each saved batch into UNet passes of that size: on the 2-core CI
    machine the built-in model's int8 graph takes 1.15 ms per image in passes of 64 and 1.66 ms in passes of 256
    (docs/BENCHMARKS.md, "UNet pass size"). on_cached gets the seeds of each batch taken from the cache, so a
    caller timing the call knows how much of it was not sampled. class_labels: one per seed (class-conditional
    models, see `sample`); a caller with a cache_dir keys it by them too. decoder: a latent model's VAE (images
    come back decoded, see `sample`).
    """
    forward_batch = batch_size if forward_batch is None else forward_batch
    for name, value in (("batch_size", batch_size), ("forward_batch", forward_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    cached = cached_images(cache_dir) if cache_dir is not None else {}
    with tqdm(total=len(seeds) * steps, desc=f"{sampler}-{steps} x{len(seeds)}", unit="img-step") as bar:
        outputs = []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            if all(seed in cached for seed in chunk):
                outputs.append(torch.stack([cached[seed] for seed in chunk]))
                bar.update(len(chunk) * steps)
                if on_cached is not None:
                    on_cached(chunk)
                continue
            labels = None if class_labels is None else list(class_labels[start:start + batch_size])
            batch = sample(unet, scheduler_config, chunk, sampler=sampler, steps=steps, eta=eta,
                           batch_size=forward_batch, callback=lambda i, n, t, x: bar.update(len(x)),
                           class_labels=labels, decoder=decoder)
            if cache_dir is not None:
                path = seed_batch_path(cache_dir, chunk, ".safetensors")
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp, b=batch: save_file({"samples": b.contiguous()}, str(tmp)))
            outputs.append(batch)
        return torch.cat(outputs)


def cached_images(cache_dir: str | Path) -> dict[int, torch.Tensor]:
    """Seed -> image from every finished batch file; files whose size does not match the seed range in their name
    (a batch of non-consecutive seeds) are left out rather than guessed at."""
    images: dict[int, torch.Tensor] = {}
    for path, seeds in seed_batch_files(cache_dir, ".safetensors"):
        batch = load_file(path)["samples"]
        if len(batch) == len(seeds):
            images.update(zip(seeds, batch, strict=True))
    return images


def seed_batch_path(directory: str | Path, seeds: Sequence[int], suffix: str) -> Path:
    """A batch file named by its seed range: `seeds-FIRST-LAST<suffix>` (the one naming every batch store uses)."""
    return Path(directory) / f"seeds-{seeds[0]}-{seeds[-1]}{suffix}"


def seed_batch_files(directory: str | Path, suffix: str) -> Iterator[tuple[Path, range]]:
    """Every `seed_batch_path` file in a directory with the seeds its name covers, in name order."""
    for path in sorted(Path(directory).glob(f"seeds-*-*{suffix}")):
        first, last = (int(part) for part in path.name.removesuffix(suffix).split("-")[1:3])
        yield path, range(first, last + 1)


def samples_cache_dir(root: str | Path, diffusion: DiffusionModel, variant: str, sampler: str, steps: int,
                      eta: float = 0.0) -> Path:
    """Where `generate_in_batches` keeps one model variant's samples: keyed by weights hash, variant and sampler."""
    model_dir = f"{diffusion.name}-{hash_state_dict(diffusion.unet)[:12]}"
    return Path(root) / model_dir / variant / f"{sampler}{steps}-eta{eta:g}"


def evaluate_fd_real(n: int = 2000, seed: int = 0, classifier: str | Path | None = None) -> dict:
    """FD of n real training images vs the test split: the floor a perfect generator would reach at this n."""
    clf = load_classifier(classifier)
    x, _ = fashion_mnist_tensor("train")
    subset = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]
    fd = frechet_distance(*gaussian_stats(extract_features(clf, subset)), *reference_stats(clf))
    return {"model": "real Fashion-MNIST train images", "n": n, "seed": seed, "fd": round(fd, 3)}


def evaluate_fd(model: str | None, sampler: str = "ddim", steps: int = 100, n: int = 2000, seed: int = 0,
                batch_size: int = 250, classifier: str | Path | None = None,
                samples_dir: str | Path | None = None) -> dict:
    """Sample n images (seeds seed..seed+n-1), return FD vs the test split and the predicted-class histogram.

    With `samples_dir`, finished batches are kept there and an interrupted run resumes (see generate_in_batches).
    """
    clf = load_classifier(classifier)
    mu_ref, sigma_ref = reference_stats(clf)
    diffusion = load_model(model)
    cache_dir = None if samples_dir is None else samples_cache_dir(samples_dir, diffusion, "fp32", sampler, steps)
    start = time.time()
    samples = generate_in_batches(diffusion.unet, diffusion.scheduler_config, list(range(seed, seed + n)),
                                  sampler, steps, batch_size, cache_dir=cache_dir)
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
