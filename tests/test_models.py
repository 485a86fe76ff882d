from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from quantizer.diffusion.models import BUILTIN_MODEL_NAME, load_model
from quantizer.diffusion.sampling import sample


def test_builtin_model_loads_with_diffusers(builtin_model_dir):
    unet = UNet2DModel.from_pretrained(builtin_model_dir / "unet")
    assert unet.config.sample_size == 32 and unet.config.in_channels == 1
    weights = builtin_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.exists() and weights.stat().st_size < 25 * 2**20
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    sched = DDPMScheduler.from_pretrained(builtin_model_dir / "scheduler")
    assert sched.config.num_train_timesteps == 1000


def test_load_model_by_builtin_name_and_sample(builtin_model_dir):
    model = load_model(BUILTIN_MODEL_NAME)
    assert model.name == BUILTIN_MODEL_NAME and model.sample_shape == (1, 32, 32)
    x = sample(model.unet, model.scheduler_config, [0, 1], sampler="ddim", steps=4)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()


def test_every_committed_model_is_a_named_builtin(builtin_model_dir, tmp_path, monkeypatch):
    """`--model fashion-mnist-ddpm-cond` (or PTQ4DM_MODELS=...) finds the committed folder, never the hub; a local
    folder of the same name in the working directory still wins."""
    from quantizer.diffusion.kinds import MODELS_DIR, builtin_model_names, resolve_model_path

    names = builtin_model_names()
    assert BUILTIN_MODEL_NAME in names and "fashion-mnist-ddpm-cond" in names
    assert "fashion-mnist-classifier" not in names  # no unet/: not a diffusion model
    model = load_model("fashion-mnist-ddpm-cond")
    assert model.name == "fashion-mnist-ddpm-cond" and model.num_classes == 10
    assert model.path == (MODELS_DIR / "fashion-mnist-ddpm-cond").resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion-mnist-ddpm-cond").mkdir()
    assert resolve_model_path("fashion-mnist-ddpm-cond") == "fashion-mnist-ddpm-cond"
    assert resolve_model_path("someone/fashion-mnist-ddpm-cond") == "someone/fashion-mnist-ddpm-cond"


def test_load_model_from_bare_unet_folder(tmp_path, tiny_unet, scheduler_config):
    """The google/ddpm-* layout: config.json, weights and scheduler_config.json side by side."""
    tiny_unet.save_pretrained(tmp_path)
    DDPMScheduler(**scheduler_config).save_config(tmp_path)
    model = load_model(tmp_path)
    assert model.sample_shape == (1, 16, 16)
    assert model.scheduler_config["num_train_timesteps"] == 1000
    for a, b in zip(model.unet.parameters(), tiny_unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_model_rejects_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="model"):
        load_model(tmp_path)
