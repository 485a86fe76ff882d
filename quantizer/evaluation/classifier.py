"""A small Fashion-MNIST CNN: the project's own feature extractor for FD (Inception weights are unreachable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from quantizer.diffusion.models import MODELS_DIR
from quantizer.evaluation.data import fashion_mnist_tensor

BUILTIN_CLASSIFIER = MODELS_DIR / "fashion-mnist-classifier" / "model.safetensors"
FEATURE_DIM = 128


class FashionClassifier(nn.Module):
    """Input 1x32x32 in [-1, 1] (model space); `features` is the penultimate layer used for FD."""

    def __init__(self) -> None:
        super().__init__()
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ClassifierTrainConfig:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    output: str = str(BUILTIN_CLASSIFIER)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px: cheap, label-preserving, and it helps on generated (imperfect) images."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train_classifier(cfg: ClassifierTrainConfig) -> tuple[FashionClassifier, float]:
    """Train on the train split, report test accuracy, save as safetensors."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = fashion_mnist_tensor("train")
    xt, yt = fashion_mnist_tensor("test")
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    bar = tqdm(total=steps, desc="train-classifier", unit="step")
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // cfg.batch_size):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = nn.functional.cross_entropy(model(_augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = accuracy(model, xt, yt)
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), cfg.output, metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(cfg.epochs)})
    return model, acc


def load_classifier(path: str | Path | None = None) -> FashionClassifier:
    model = FashionClassifier()
    model.load_state_dict(load_file(str(path or BUILTIN_CLASSIFIER)))
    return model.eval().requires_grad_(False)
