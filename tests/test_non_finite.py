"""NaN/inf is an error, never data: calibration names the layer and time-step, sampling fails instead of a black PNG.

The failing model is a real one: a UNet with a Fourier time embedding takes log(t), and a DDIM schedule with
'leading' spacing ends at t = 0, so the full-precision model itself produces -inf there.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from test_service_api import client_for, make_settings, wait_ready, wait_status

from quantizer.diffusion.images import NonFiniteImageError, non_finite_images, to_uint8
from quantizer.diffusion.sampling import make_scheduler, sample
from quantizer.ptq.calibration import build_calibration_set
from quantizer.ptq.config import CalibrationConfig, PTQ4DMConfig, QuantConfig
from quantizer.ptq.quantize import quantize_

pytest_plugins = ["service.testing"]


@pytest.fixture(scope="module")
def fourier_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, time_embedding_type="fourier").eval().requires_grad_(False)


@pytest.fixture(scope="module")
def leading_config(scheduler_config: dict) -> dict:
    return {**scheduler_config, "timestep_spacing": "leading"}


def test_the_model_really_diverges_at_t0(fourier_unet, leading_config):
    assert int(make_scheduler("ddim", leading_config, 10).timesteps[-1]) == 0
    x = sample(fourier_unet, leading_config, [0, 1], steps=10)
    assert non_finite_images(x) == [0, 1]
    with pytest.raises(NonFiniteImageError, match="2 of 2 generated images hold non-finite"):
        to_uint8(x)


def test_to_uint8_names_only_the_bad_images():
    x = torch.zeros(3, 1, 2, 2)
    x[1, 0, 0, 0] = float("inf")
    assert non_finite_images(x) == [1]
    with pytest.raises(NonFiniteImageError) as info:
        to_uint8(x)
    assert info.value.indices == [1]


def test_calibration_names_the_layer_and_the_time_step(fourier_unet, leading_config):
    config = CalibrationConfig(method="uniform", n_samples=20, steps=10, batch_size=10)
    calibration = build_calibration_set(fourier_unet, leading_config, config, progress=False)
    assert torch.isfinite(calibration.xs).all()  # the inputs are fine: the NaN is born inside the model
    assert 0 in calibration.ts.tolist()
    with pytest.raises(ValueError, match=r"layer 'time_embedding\.linear_1' at time-step\(s\) \[0\]"):
        quantize_(fourier_unet, PTQ4DMConfig(QuantConfig(), config), calibration, progress=False)
    assert not any("Quant" in type(m).__name__ for m in fourier_unet.modules())  # the model is given back as it was


def test_diverging_trajectories_are_refused(tiny_unet, scheduler_config):
    broken = UNet2DModel.from_config(tiny_unet.config).eval().requires_grad_(False)
    broken.load_state_dict(tiny_unet.state_dict())
    broken.conv_out.bias.fill_(float("nan"))  # a corrupted checkpoint: every UNet output is NaN
    config = CalibrationConfig(method="uniform", n_samples=8, steps=4, batch_size=8)
    with pytest.raises(ValueError, match="trajectories hold non-finite x_t .* in 6 of 8 samples"):
        build_calibration_set(broken, scheduler_config, config, progress=False)


def test_degenerate_range_is_reported(tiny_unet, scheduler_config):
    config = CalibrationConfig(method="uniform", n_samples=4, steps=2, batch_size=4)
    calibration = build_calibration_set(tiny_unet, scheduler_config, config, progress=False)
    calibration.xs.zero_()  # conv_in sees only zeros
    unet = UNet2DModel.from_config(tiny_unet.config).eval().requires_grad_(False)
    unet.load_state_dict(tiny_unet.state_dict())
    with pytest.warns(RuntimeWarning, match=r"the input of layer 'conv_in' saw only zeros"):
        quantize_(unet, PTQ4DMConfig(QuantConfig(n_candidates=4), config), calibration, progress=False)


def test_a_diverging_job_fails_with_the_reason_and_the_worker_goes_on(fourier_unet, leading_config, tmp_path):
    fourier_unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler.from_config(leading_config).save_config(tmp_path / "scheduler")
    with client_for(make_settings(tmp_path, default_steps=4)) as client:
        wait_ready(client)
        for seed in (3, 4):  # the second job proves the worker survived the first
            job_id = client.post("/v1/jobs", json={"seed": seed, "n": 2}).json()["id"]
            job = wait_status(client, job_id, {"succeeded", "failed"})
            assert job["status"] == "failed"
            assert f"image 0 (seed {seed}) came out with non-finite values" in job["error"]
            assert client.get(f"/v1/jobs/{job_id}/images/0").status_code in (404, 409)
        assert 'ptq4dm_job_failures_total{reason="non_finite"} 2.0' in client.get("/metrics").text
