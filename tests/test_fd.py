from __future__ import annotations

import numpy as np
import pytest
import torch

from quantizer.evaluation.classifier import BUILTIN_CLASSIFIER, accuracy, load_classifier
from quantizer.evaluation.data import FASHION_MNIST_DIR, fashion_mnist_tensor
from quantizer.evaluation.fd import fd_between, frechet_distance

needs_data = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(size=(d, d))
    sigma = a @ a.T + np.eye(d)
    assert frechet_distance(np.zeros(d), sigma, np.zeros(d), sigma) == pytest.approx(0.0, abs=1e-6)
    shift = np.full(d, 0.5)
    assert frechet_distance(np.zeros(d), sigma, shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Isotropic: Tr(S1 + S2 - 2 sqrt(S1 S2)) = d (s1 - s2)^2 for S = s^2 I.
    assert frechet_distance(np.zeros(d), 4 * np.eye(d), np.zeros(d), np.eye(d)) == pytest.approx(d * 1.0)


@needs_data
def test_committed_classifier_accuracy_at_least_90_percent():
    assert BUILTIN_CLASSIFIER.exists()
    x, y = fashion_mnist_tensor("test")
    assert accuracy(load_classifier(), x, y) >= 0.90


@needs_data
def test_fd_separates_real_from_corrupted_images():
    clf = load_classifier()
    x, _ = fashion_mnist_tensor("test")
    real_a, real_b = x[:1000], x[1000:2000]
    noisy = (real_b + 0.5 * torch.randn(real_b.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    same = fd_between(clf, real_a, real_b)
    corrupted = fd_between(clf, real_a, noisy)
    assert corrupted > 5 * same


def test_generate_in_batches_resumes_from_finished_batches(tiny_unet, scheduler_config, tmp_path):
    from quantizer.evaluation.evaluate import generate_in_batches

    calls = {"n": 0}
    handle = tiny_unet.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        seeds = list(range(10, 15))
        first = generate_in_batches(tiny_unet, scheduler_config, seeds, "ddim", 3, batch_size=2, cache_dir=tmp_path)
        files = sorted(p.name for p in tmp_path.iterdir())
        assert files == ["seeds-10-11.safetensors", "seeds-12-13.safetensors", "seeds-14-14.safetensors"]
        assert calls["n"] == 3 * 3
        (tmp_path / "seeds-12-13.safetensors").unlink()  # an interrupted run: one batch missing
        reused: list[int] = []
        again = generate_in_batches(tiny_unet, scheduler_config, seeds, "ddim", 3, batch_size=2, cache_dir=tmp_path,
                                    on_cached=reused.extend)
        assert calls["n"] == 3 * 3 + 3  # only the missing batch was sampled
        assert reused == [10, 11, 14]  # and the caller is told which seeds were not
        assert torch.equal(first, again)
        other = generate_in_batches(tiny_unet, scheduler_config, seeds, "ddim", 3, batch_size=4, cache_dir=tmp_path)
        assert calls["n"] == 3 * 3 + 3  # another batch size still reuses every cached image
        assert torch.equal(first, other)
        split = generate_in_batches(tiny_unet, scheduler_config, seeds, "ddim", 3, batch_size=4,
                                    cache_dir=tmp_path / "split", forward_batch=1)
        assert calls["n"] == 3 * 3 + 3 + 5 * 3  # one UNet pass per image and step
        assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["seeds-10-13.safetensors",
                                                                          "seeds-14-14.safetensors"]
        torch.testing.assert_close(split, first)
        bad = (("batch_size", {"batch_size": 0}), ("forward_batch", {"batch_size": 2, "forward_batch": 0}))
        for field, kwargs in bad:
            with pytest.raises(ValueError, match=f"{field} must be >= 1"):
                generate_in_batches(tiny_unet, scheduler_config, seeds, "ddim", 3, **kwargs)
    finally:
        handle.remove()
