"""bench/perturbation.py injects error of exactly the stated relative size, only inside its time-step window."""

from __future__ import annotations

import torch


def test_noise_has_the_stated_size_only_inside_the_window(tiny_unet):
    from bench.perturbation import NoisyUNet

    noisy = NoisyUNet(tiny_unet, rel=0.02, window=(500, 1000))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean_800, clean_100 = tiny_unet(x, 800).sample, tiny_unet(x, 100).sample
        inside, outside = noisy(x, torch.tensor(800)).sample, noisy(x, torch.tensor(100)).sample
    rel = (inside - clean_800).flatten(1).norm(dim=1) / clean_800.flatten(1).norm(dim=1)
    assert torch.allclose(rel, torch.full((3,), 0.02), rtol=1e-4)
    assert torch.equal(outside, clean_100)
