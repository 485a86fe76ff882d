from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler

from quantizer.diffusion.sampling import sample
from quantizer.ptq.calibration import (
    build_calibration_set,
    draw_step_indices,
    sample_shape,
    sampler_timesteps,
)
from quantizer.ptq.config import CalibrationConfig


@pytest.fixture()
def counted_unet(tiny_unet):
    """A private copy of the tiny UNet whose forward calls are counted by a pre-hook."""
    unet = copy.deepcopy(tiny_unet)
    calls = {"n": 0}

    def count(_module, _args):
        calls["n"] += 1

    unet.register_forward_pre_hook(count)
    return unet, calls


@pytest.mark.parametrize(("mu", "sigma"), [(0.3, 0.1), (0.2, 0.05), (0.45, 0.08)])
def test_ndtc_positions_follow_the_normal_on_the_image_side(scheduler_config, mu, sigma):
    steps, n = 100, 20000
    timesteps = sampler_timesteps(scheduler_config, "ddim", steps)
    cfg = CalibrationConfig(method="ndtc", n_samples=n, mu=mu, sigma=sigma, steps=steps)
    index = draw_step_indices(cfg, timesteps, torch.Generator().manual_seed(0))
    from_image_end = (steps - 1 - index).double()
    assert abs(from_image_end.mean().item() - mu * steps) < 0.5
    assert abs(from_image_end.std().item() - sigma * steps) < 0.5
    # Image side: the diffusion time-steps fed to the UNet sit below T/2 on average.
    assert timesteps[index].double().mean().item() < scheduler_config["num_train_timesteps"] / 2


@pytest.mark.parametrize(("mu", "sigma"), [(0.3, 0.1), (0.2, 0.05)])
def test_ndtc_code_counts_from_the_noise_end(scheduler_config, mu, sigma):
    steps, n = 100, 20000
    timesteps = sampler_timesteps(scheduler_config, "ddim", steps)
    cfg = CalibrationConfig(method="ndtc_code", n_samples=n, mu=mu, sigma=sigma, steps=steps)
    index = draw_step_indices(cfg, timesteps, torch.Generator().manual_seed(0)).double()
    assert abs(index.mean().item() - mu * steps) < 0.5
    assert abs(index.std().item() - sigma * steps) < 0.5
    assert timesteps[index.long()].double().mean().item() > scheduler_config["num_train_timesteps"] / 2


def test_default_ndtc_and_code_variant_mirror_each_other(scheduler_config):
    timesteps = sampler_timesteps(scheduler_config, "ddim", 100)
    paper = draw_step_indices(CalibrationConfig(method="ndtc", n_samples=5000), timesteps,
                              torch.Generator().manual_seed(1))
    code = draw_step_indices(CalibrationConfig(method="ndtc_code", n_samples=5000), timesteps,
                             torch.Generator().manual_seed(1))
    # Same draws, counted from opposite ends; clipping keeps both inside the trajectory.
    assert torch.equal(paper, 99 - code)
    assert paper.min() >= 0 and paper.max() <= 99
    assert timesteps[paper].float().mean() < timesteps[code].float().mean()


def test_uniform_and_single_step_positions(scheduler_config):
    timesteps = sampler_timesteps(scheduler_config, "ddim", 10)
    uniform = draw_step_indices(CalibrationConfig(method="uniform", n_samples=10, steps=10), timesteps)
    assert uniform.tolist() == list(range(10))
    single = draw_step_indices(CalibrationConfig(method="single_step", n_samples=7, steps=10, single_step_t=3),
                               timesteps)
    assert single.unique().numel() == 1
    assert timesteps[single[0]] == timesteps[(timesteps - 3).abs().argmin()]
    middle = draw_step_indices(CalibrationConfig(method="single_step", n_samples=3, steps=10), timesteps)
    assert middle.tolist() == [5, 5, 5]


@pytest.mark.parametrize("method", ["ndtc", "uniform", "ndtc_code"])
def test_recorded_inputs_are_the_fp_samplers_own_trajectories(tiny_unet, scheduler_config, method):
    """Each x_t must equal what quantizer.diffusion.sampling.sample feeds the UNet at that step for that seed."""
    steps = 10
    cfg = CalibrationConfig(method=method, n_samples=7, mu=0.3, sigma=0.3, steps=steps, batch_size=3, seed=4)
    calib = build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    assert calib.xs.shape == (7, *sample_shape(tiny_unet))
    assert calib.xs.dtype == torch.float32 and calib.ts.dtype == torch.long
    # Alone, each seed gives the same x_t up to float noise from batching (different seeds/steps differ by O(1)).
    for k in range(len(calib)):
        seen = {}

        def grab(i, total, t, x, k=k, seen=seen):
            if i == int(calib.step_indices[k]):
                seen["x"], seen["t"] = x.clone(), t

        sample(tiny_unet, scheduler_config, [int(calib.seeds[k])], sampler="ddim", steps=steps, callback=grab)
        torch.testing.assert_close(calib.xs[k], seen["x"][0], atol=1e-3, rtol=0)
        assert int(calib.ts[k]) == seen["t"]
    # Replaying the same batches (samples grouped in order of step) reproduces them bit for bit.
    order = torch.argsort(calib.step_indices, stable=True)
    for idx in order.split(cfg.batch_size):
        trajectory = []
        sample(tiny_unet, scheduler_config, calib.seeds[idx].tolist(), sampler="ddim", steps=steps,
               callback=lambda i, total, t, x, trajectory=trajectory: trajectory.append(x.clone()))
        for row, k in enumerate(idx.tolist()):
            assert torch.equal(calib.xs[k], trajectory[int(calib.step_indices[k])][row])
    timesteps = sampler_timesteps(scheduler_config, "ddim", steps)
    assert torch.equal(calib.ts, timesteps[calib.step_indices])


def test_batched_trajectories_stop_once_every_sample_is_recorded(counted_unet, scheduler_config):
    unet, calls = counted_unet
    cfg = CalibrationConfig(method="ndtc_code", n_samples=10, mu=0.3, sigma=0.3, steps=20, batch_size=4, seed=2)
    calib = build_calibration_set(unet, scheduler_config, cfg, progress=False)
    # Batches are formed in order of step; each stops before the UNet call at its deepest step.
    ordered = calib.step_indices.sort().values
    expected = sum(int(chunk.max()) for chunk in ordered.split(cfg.batch_size))
    assert calls["n"] == expected
    assert calls["n"] < (cfg.n_samples // cfg.batch_size + 1) * cfg.steps


def test_calibration_set_is_reproducible_and_seed_dependent(tiny_unet, scheduler_config):
    cfg = CalibrationConfig(method="ndtc", n_samples=5, steps=8, batch_size=5, seed=11)
    a = build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    b = build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    torch.testing.assert_close(a.xs, b.xs, rtol=0, atol=0)
    assert torch.equal(a.ts, b.ts)
    other = build_calibration_set(tiny_unet, scheduler_config, CalibrationConfig(
        method="ndtc", n_samples=5, steps=8, batch_size=5, seed=12), progress=False)
    assert not torch.equal(a.seeds, other.seeds)


def test_single_step_set(tiny_unet, scheduler_config):
    cfg = CalibrationConfig(method="single_step", n_samples=4, steps=10, single_step_t=0, batch_size=2)
    calib = build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    assert calib.step_indices.tolist() == [9] * 4
    assert calib.ts.unique().numel() == 1
    assert len({tuple(x.flatten()[:4].tolist()) for x in calib.xs}) == 4  # distinct trajectories


def test_real_noised_is_the_forward_process_of_the_given_images(tiny_unet, scheduler_config):
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(12, *sample_shape(tiny_unet), generator=gen) * 2 - 1
    cfg = CalibrationConfig(method="real_noised", n_samples=64, seed=3)
    calib = build_calibration_set(tiny_unet, scheduler_config, cfg, real_images=real, progress=False)
    num_train = scheduler_config["num_train_timesteps"]
    assert calib.xs.shape == (64, *real.shape[1:])
    assert calib.ts.min() >= 0 and calib.ts.max() < num_train
    assert torch.all(calib.step_indices == -1)
    abar = DDPMScheduler.from_config(scheduler_config).alphas_cumprod
    for x_t, t in zip(calib.xs, calib.ts, strict=True):
        a = abar[t]
        # For the right x_0, (x_t - sqrt(abar) x_0) / sqrt(1 - abar) is the unit Gaussian noise that was added.
        residual = (x_t - a.sqrt() * real) / (1 - a).sqrt()
        variance = residual.flatten(1).pow(2).mean(1)
        assert 0.6 < variance.min().item() < 1.4


def test_real_noised_needs_matching_images(tiny_unet, scheduler_config):
    cfg = CalibrationConfig(method="real_noised", n_samples=4)
    with pytest.raises(ValueError, match="real_images"):
        build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    with pytest.raises(ValueError, match="real_images"):
        build_calibration_set(tiny_unet, scheduler_config, cfg, real_images=torch.zeros(3, 1, 8, 8), progress=False)


def test_batches_cover_the_set_in_order(tiny_unet, scheduler_config):
    cfg = CalibrationConfig(method="uniform", n_samples=5, steps=5, batch_size=2)
    calib = build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)
    parts = list(calib.batches())
    assert [len(xs) for xs, _ in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([xs for xs, _ in parts]), calib.xs)
    assert torch.equal(torch.cat([ts for _, ts in parts]), calib.ts)


@pytest.mark.parametrize(("field", "kwargs"), [
    ("method", {"method": "random"}),
    ("n_samples", {"n_samples": 0}),
    ("mu", {"mu": 1.5}),
    ("sigma", {"sigma": 0.0}),
    ("sampler", {"sampler": "euler"}),
    ("steps", {"steps": 0}),
    ("eta", {"eta": 2.0}),
    ("single_step_t", {"single_step_t": -1}),
    ("batch_size", {"batch_size": 0}),
    ("seed", {"seed": 1.5}),
])
def test_calibration_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


def test_steps_beyond_the_training_schedule_are_rejected(tiny_unet, scheduler_config):
    cfg = CalibrationConfig(steps=scheduler_config["num_train_timesteps"] + 1, n_samples=2)
    with pytest.raises(ValueError, match="steps"):
        build_calibration_set(tiny_unet, scheduler_config, cfg, progress=False)


def test_every_trajectory_method_is_one_registered_draw(scheduler_config):
    from quantizer.ptq.config import CALIBRATION_METHODS
    from quantizer.ptq.timestep_draws import TIMESTEP_DRAWS, draw_for

    assert set(TIMESTEP_DRAWS) | {"real_noised"} == set(CALIBRATION_METHODS)
    timesteps = sampler_timesteps(scheduler_config, "ddim", 10)
    for name, draw in TIMESTEP_DRAWS.items():
        index = draw.step_indices(CalibrationConfig(method=name, n_samples=7, steps=10), timesteps, None)
        assert index.shape == (7,) and int(index.min()) >= 0 and int(index.max()) <= 9, name
    with pytest.raises(ValueError, match="real_noised"):
        draw_for("real_noised")
