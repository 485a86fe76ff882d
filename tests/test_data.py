from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from quantizer.evaluation.data import FASHION_MNIST_DIR, load_fashion_mnist, to_model_space


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def test_idx_parsing_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (7,), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    got_x, got_y = load_fashion_mnist("test", directory=tmp_path)
    assert np.array_equal(got_x, images) and np.array_equal(got_y, labels)


def test_missing_files_and_bad_split_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", directory=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_padding_to_32_keeps_content_centered():
    img = np.full((1, 28, 28), 255, dtype=np.uint8)
    x = to_model_space(img)
    assert x.shape == (1, 1, 32, 32)
    assert x[0, 0, 2:30, 2:30].eq(1).all() and x[0, 0, :2].eq(-1).all() and x[0, 0, :, 30:].eq(-1).all()


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_shapes():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
