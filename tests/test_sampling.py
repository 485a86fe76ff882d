from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.sampling import sample


@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_image_depends_only_on_its_seed(tiny_unet, scheduler_config, sampler, eta):
    seeds = [11, 22, 33, 44, 55]
    together = sample(tiny_unet, scheduler_config, seeds, sampler=sampler, steps=8, eta=eta)
    one_by_one = sample(tiny_unet, scheduler_config, seeds, sampler=sampler, steps=8, eta=eta, batch_size=1)
    # Same seed with other neighbours, in another position of another batch size.
    shuffled = sample(tiny_unet, scheduler_config, [99, 33, 11], sampler=sampler, steps=8, eta=eta, batch_size=2)
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)
    torch.testing.assert_close(shuffled[1], together[2], atol=1e-4, rtol=0)
    torch.testing.assert_close(shuffled[2], together[0], atol=1e-4, rtol=0)
    assert np.abs(to_uint8(together).astype(int) - to_uint8(one_by_one).astype(int)).max() <= 1
    # Different seeds give different images.
    assert (together[0] - together[1]).abs().max() > 0.1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_produce_images_of_right_shape_and_dtype(tiny_unet, scheduler_config, sampler):
    x = sample(tiny_unet, scheduler_config, [1, 2, 3], sampler=sampler, steps=5)
    assert x.shape == (3, 1, 16, 16)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    images = to_uint8(x)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8


def test_stochastic_samplers_differ_from_deterministic(tiny_unet, scheduler_config):
    ddim0 = sample(tiny_unet, scheduler_config, [5], sampler="ddim", steps=6, eta=0.0)
    ddim1 = sample(tiny_unet, scheduler_config, [5], sampler="ddim", steps=6, eta=1.0)
    assert (ddim0 - ddim1).abs().max() > 1e-3


def test_concurrent_generations_do_not_interfere(tiny_unet, scheduler_config):
    jobs = {"a": ("ddpm", 7, 0.0, [1, 2]), "b": ("ddim", 4, 0.5, [3, 4, 5])}
    expected = {k: sample(tiny_unet, scheduler_config, seeds, sampler=s, steps=n, eta=eta)
                for k, (s, n, eta, seeds) in jobs.items()}
    results: dict[str, torch.Tensor] = {}

    def run(key: str) -> None:
        s, n, eta, seeds = jobs[key]
        for _ in range(3):
            results[key] = sample(tiny_unet, scheduler_config, seeds, sampler=s, steps=n, eta=eta)

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in jobs:
        torch.testing.assert_close(results[key], expected[key], atol=1e-4, rtol=0)


def test_callback_sees_every_step_and_can_cancel(tiny_unet, scheduler_config):
    seen: list[tuple[int, int, int]] = []
    def record(i: int, n: int, t: int, x: torch.Tensor) -> None:
        seen.append((i, n, t))

    sample(tiny_unet, scheduler_config, [0], sampler="ddim", steps=5, callback=record)
    assert [s[0] for s in seen] == list(range(5))
    assert all(n == 5 for _, n, _ in seen)
    assert seen[0][2] > seen[-1][2]  # from the noise end toward x_0

    class Stop(Exception):
        pass

    def cancel(i: int, n: int, t: int, x: torch.Tensor) -> None:
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(tiny_unet, scheduler_config, [0], sampler="ddpm", steps=5, callback=cancel)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"sampler": "euler"}, "sampler"),
        ({"seeds": []}, "n"),
        ({"eta": 1.5}, "eta"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tiny_unet, scheduler_config, kwargs, name):
    args = {"seeds": [1], "sampler": "ddim", "steps": 3} | kwargs
    with pytest.raises(ValueError, match=name):
        sample(tiny_unet, scheduler_config, **args)


def test_full_length_ddpm_steps_is_valid(tiny_unet, scheduler_config):
    """steps == T is the upper bound and must be accepted (checked through validation only: it is slow)."""
    from quantizer.diffusion.sampling import validate_request

    validate_request("ddpm", 1000, 0.0, 1, 1000)
    with pytest.raises(ValueError, match="steps"):
        validate_request("ddpm", 1001, 0.0, 1, 1000)
