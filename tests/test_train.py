from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET_CONFIG
from diffusers import UNet2DModel

from quantizer.evaluation.data import FASHION_MNIST_DIR
from quantizer.evaluation.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")


def _config(tmp_path, name: str, steps: int) -> TrainConfig:
    unet = dict(TINY_UNET_CONFIG, sample_size=32)
    return TrainConfig(output_dir=str(tmp_path / name / "model"), checkpoint_dir=str(tmp_path / name / "ckpt"),
                       steps=steps, batch_size=4, warmup_steps=2, checkpoint_every=2, unet=unet)


def test_resumed_training_equals_uninterrupted(tmp_path):
    straight = train(_config(tmp_path, "straight", 4))
    train(_config(tmp_path, "resumed", 2))
    resumed = train(_config(tmp_path, "resumed", 4))  # picks up the checkpoint at step 2
    a = UNet2DModel.from_pretrained(straight / "unet")
    b = UNet2DModel.from_pretrained(resumed / "unet")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=f"{name} differs after resume")
    state = torch.load(tmp_path / "resumed" / "ckpt" / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["wall_s"] > 0
    log = (tmp_path / "resumed" / "ckpt" / "loss.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,elapsed_s"
    assert (resumed / "scheduler" / "scheduler_config.json").exists()
