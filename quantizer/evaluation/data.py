"""Real training/calibration data: Fashion-MNIST from Debian's idx files, CIFAR-10 from shared assets."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("PTQ4DM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    """Parse an (optionally gzipped) idx file: magic (2 zero bytes, dtype, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}; "
        "install Debian's dataset-fashion-mnist or set PTQ4DM_FASHION_MNIST_DIR"
    )


def load_fashion_mnist(split: str = "train", directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 N x 28 x 28, labels uint8 N) for split 'train' or 't10k'/'test'."""
    if split not in ("train", "test", "t10k"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    directory = directory or FASHION_MNIST_DIR
    images = _read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    return images, labels


def to_model_space(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 N x H x W (x C) -> float N x C x size x size in [-1, 1], zero-padded (black) to `size`."""
    x = torch.from_numpy(np.array(images, copy=True)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"images of {tuple(x.shape[-2:])} do not fit in size {size}")
    x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x / 127.5 - 1.0


def fashion_mnist_tensor(split: str = "train", size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as model-space tensors (padded to 32x32, [-1, 1]) and int64 labels."""
    images, labels = load_fashion_mnist(split)
    return to_model_space(images, size), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test split (N x 32 x 32 x 3 uint8, labels) from ../shared/assets; optional for RGB experiments."""
    path = path or Path(__file__).resolve().parents[3] / "shared" / "assets" / "cifar10_test.npz"
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 archive not found at {path}")
    data = np.load(path)
    return data["images"], data["labels"]
