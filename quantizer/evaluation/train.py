"""Train the built-in DDPM on Fashion-MNIST: resumable, seeded, logged, exported in diffusers layout."""

from __future__ import annotations

import csv
import json
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from quantizer.evaluation.data import fashion_mnist_tensor

# A small UNet: 2.7M parameters, one self-attention block at 8x8 so the attention path is exercised.
DEFAULT_UNET_CONFIG: dict = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}
DEFAULT_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}


@dataclass
class TrainConfig:
    output_dir: str = "models/fashion-mnist-ddpm"
    checkpoint_dir: str = "runs/fashion-mnist-ddpm"
    steps: int = 7675
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    seed: int = 0
    checkpoint_every: int = 250
    max_minutes: float | None = None
    unet: dict = field(default_factory=lambda: dict(DEFAULT_UNET_CONFIG))
    scheduler: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULER_CONFIG))


class _StopFlag:
    """Turns SIGINT/SIGTERM into a clean checkpoint + export instead of lost work (restored on exit)."""

    def __enter__(self) -> _StopFlag:
        self.stop = False
        self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, *_: object) -> None:
        self.stop = True


def _save_checkpoint(path: Path, unet: UNet2DModel, ema: EMAModel, opt: torch.optim.Optimizer,
                     step: int, gen: torch.Generator, cfg: TrainConfig, wall_s: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(
        {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
         "gen": gen.get_state(), "config": asdict(cfg), "wall_s": wall_s},
        tmp,
    )
    tmp.replace(path / "state.pt")


def export(unet: UNet2DModel, ema: EMAModel, scheduler: DDPMScheduler, output_dir: Path) -> None:
    """Write the EMA weights (fp32 safetensors) and scheduler config in diffusers layout."""
    export_unet = UNet2DModel.from_config(unet.config)
    ema.copy_to(export_unet.parameters())
    export_unet.save_pretrained(output_dir / "unet", safe_serialization=True)
    scheduler.save_pretrained(output_dir / "scheduler")


def train(cfg: TrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    out, ckpt_dir = Path(cfg.output_dir), Path(cfg.checkpoint_dir)
    data, _ = fashion_mnist_tensor("train", size=cfg.unet["sample_size"])
    unet = UNet2DModel(**cfg.unet)
    scheduler = DDPMScheduler(**cfg.scheduler)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_at = lambda s: cfg.lr * min(1.0, (s + 1) / cfg.warmup_steps)  # noqa: E731
    gen = torch.Generator().manual_seed(cfg.seed)
    step, wall_before = 0, 0.0
    state_file = ckpt_dir / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step = state["step"]
        wall_before = float(state.get("wall_s", 0.0))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    # elapsed_s is the wall time summed over every resumed run (the checkpoint carries it).
    log_path = ckpt_dir / "loss.csv"
    new_log = not log_path.exists()
    log = open(log_path, "a", newline="")  # noqa: SIM115
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "lr", "elapsed_s"])
    start = time.time()
    unet.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    running = None
    with _StopFlag() as flag:
        while step < cfg.steps and not flag.stop:
            idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
            x0 = data[idx]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
            xt = scheduler.add_noise(x0, noise, t)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            ema.step(unet.parameters())
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if step % 50 == 0:
                wall = wall_before + time.time() - start
                writer.writerow([step, f"{running:.5f}", f"{lr_at(step):.2e}", f"{wall:.1f}"])
                log.flush()
            if step % cfg.checkpoint_every == 0:
                _save_checkpoint(ckpt_dir, unet, ema, opt, step, gen, cfg, wall_before + time.time() - start)
            if cfg.max_minutes is not None and time.time() - start > cfg.max_minutes * 60:
                break
    bar.close()
    log.close()
    _save_checkpoint(ckpt_dir, unet, ema, opt, step, gen, cfg, wall_before + time.time() - start)
    export(unet, ema, scheduler, out)
    return out
