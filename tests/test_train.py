from __future__ import annotations

import pytest
import torch
from conftest import TINY_UNET_CONFIG
from diffusers import DDPMScheduler, UNet2DModel

from quantizer.diffusion.kinds import CLASS_CONDITIONAL, read_class_names
from quantizer.diffusion.models import load_model
from quantizer.evaluation.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from quantizer.evaluation.train import DEFAULT_SCHEDULER_CONFIG, TrainConfig, train
from service.cli import main as ptq4dm

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


def _assert_same_weights(a: UNet2DModel, b: UNet2DModel) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=f"{name} differs")


def test_class_conditional_fine_tune_starts_from_init_trains_and_resumes(tmp_path):
    torch.manual_seed(3)
    base_dir = tmp_path / "base"
    base = UNet2DModel(**dict(TINY_UNET_CONFIG, sample_size=32)).eval()
    base.save_pretrained(base_dir / "unet")
    DDPMScheduler(**DEFAULT_SCHEDULER_CONFIG).save_config(base_dir / "scheduler")

    def config(name: str, steps: int) -> TrainConfig:
        return TrainConfig(output_dir=str(tmp_path / name / "model"), checkpoint_dir=str(tmp_path / name / "ckpt"),
                           steps=steps, batch_size=4, warmup_steps=2, checkpoint_every=2, init=str(base_dir),
                           num_classes=10)

    # step 0: a class-conditional model whose every label predicts exactly what the unconditional one does
    start = load_model(train(config("resumed", 0)))
    assert (start.kind, start.num_classes) == (CLASS_CONDITIONAL, 10)
    assert read_class_names(tmp_path / "resumed" / "model", 10) == FASHION_MNIST_CLASSES  # the labels it learned
    x, t = torch.randn(10, 1, 32, 32), torch.randint(0, 1000, (10,))
    with torch.no_grad():
        torch.testing.assert_close(start.unet(x, t, class_labels=torch.arange(10)).sample, base(x, t).sample)
    # the CLI spelling of the same run, uninterrupted, vs resumed from the checkpoints at steps 0 and 2
    assert ptq4dm(["train", "--class-conditional", "--init", str(base_dir), "--out", str(tmp_path / "straight"),
                   "--checkpoint-dir", str(tmp_path / "straight-ckpt"), "--steps", "4", "--batch-size", "4",
                   "--warmup-steps", "2"]) == 0
    train(config("resumed", 2))
    resumed = train(config("resumed", 4))
    straight = UNet2DModel.from_pretrained(tmp_path / "straight" / "unet")
    _assert_same_weights(straight, UNet2DModel.from_pretrained(resumed / "unet"))
    assert torch.load(tmp_path / "resumed" / "ckpt" / "state.pt", weights_only=False)["step"] == 4
    # it trained: the labels now steer the prediction, and the scheduler came from the init model
    assert straight.class_embedding.weight.abs().sum() > 0
    with torch.no_grad():
        by_label = straight(x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), class_labels=torch.tensor([0, 9])).sample
    assert not torch.allclose(by_label[0], by_label[1])
    assert load_model(resumed).scheduler_config["num_train_timesteps"] == 1000
