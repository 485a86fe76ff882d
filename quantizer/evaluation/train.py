"""Train the built-in DDPMs on Fashion-MNIST: resumable, seeded, logged, exported in diffusers layout.

From scratch (the unconditional model), or fine-tuned from another model's weights (`init`): with `num_classes`
the fine-tune adds a zero-initialised class embedding, so step 0 is exactly the initial model and every label
starts from the unconditional prediction (the class-conditional model).
"""

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

from quantizer.diffusion.kinds import class_names_index, resolve_model_path, unet_config_path
from quantizer.evaluation.data import FASHION_MNIST_CLASSES, fashion_mnist_tensor

COND_MODEL_NAME = "fashion-mnist-ddpm-cond"

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
    # A model folder (diffusers layout, a bare UNet folder, or the built-in name) whose weights, UNet config and
    # scheduler replace `unet`/`scheduler`: fine-tuning instead of training from scratch.
    init: str | None = None
    # Train on the labels: a UNet2DModel with num_class_embeds=num_classes (a new embedding starts at zero).
    num_classes: int | None = None
    # lr multiplier of the class embedding: it starts at zero and, in a short fine-tune, has further to travel
    # than the pretrained weights around it.
    class_embed_lr_scale: float = 10.0


def _public(config: dict) -> dict:
    """A diffusers config without its bookkeeping keys (`_name_or_path` is a Path, and says nothing of the model)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _init_unet(cfg: TrainConfig) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler training starts from: fresh from `cfg.unet`, or `cfg.init`'s weights, class-conditional
    when `cfg.num_classes` is set."""
    if cfg.init is None:
        unet_config, state, scheduler = dict(cfg.unet), None, DDPMScheduler(**cfg.scheduler)
    else:
        directory = Path(resolve_model_path(cfg.init))
        config_path = unet_config_path(directory)
        if config_path is None:
            raise ValueError(f"init: no UNet config.json in {directory} or {directory / 'unet'}")
        base = UNet2DModel.from_pretrained(config_path.parent)
        unet_config, state = dict(base.config), base.state_dict()
        scheduler_dir = directory / "scheduler"
        scheduler = (DDPMScheduler.from_pretrained(scheduler_dir) if (scheduler_dir / "scheduler_config.json").exists()
                     else DDPMScheduler(**cfg.scheduler))
    if cfg.num_classes is not None:
        given = unet_config.get("num_class_embeds")
        if given is not None and given != cfg.num_classes:
            raise ValueError(f"init has num_class_embeds={given}, asked for num_classes={cfg.num_classes}")
        unet_config["num_class_embeds"] = cfg.num_classes
    unet = UNet2DModel.from_config(unet_config)
    if state is not None:
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"class_embedding.weight"}:
            raise ValueError(f"init weights do not fit: missing {missing}, unexpected {unexpected}")
        if missing:  # zero: the class adds nothing to the timestep embedding until training says otherwise
            torch.nn.init.zeros_(unet.class_embedding.weight)
    return unet, scheduler


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


def export(unet: UNet2DModel, ema: EMAModel, scheduler: DDPMScheduler, output_dir: Path,
           class_names: tuple[str, ...] | None = None) -> None:
    """Write the EMA weights (fp32 safetensors) and scheduler config in diffusers layout; with class_names, a
    model_index.json naming the labels too (clients such as the playground show them instead of numbers)."""
    export_unet = UNet2DModel.from_config(unet.config)
    ema.copy_to(export_unet.parameters())
    export_unet.save_pretrained(output_dir / "unet", safe_serialization=True)
    scheduler.save_pretrained(output_dir / "scheduler")
    if class_names is not None:
        (output_dir / "model_index.json").write_text(json.dumps(class_names_index(class_names), indent=2) + "\n")


def _param_groups(unet: UNet2DModel, cfg: TrainConfig) -> list[dict]:
    """One group at the base lr, plus the class embedding (if any) at `class_embed_lr_scale` times it."""
    embed = [p for name, p in unet.named_parameters() if name.startswith("class_embedding.")]
    rest = [p for name, p in unet.named_parameters() if not name.startswith("class_embedding.")]
    groups = [{"params": rest, "lr_scale": 1.0}]
    if embed:
        groups.append({"params": embed, "lr_scale": cfg.class_embed_lr_scale})
    return groups


def train(cfg: TrainConfig) -> Path:
    torch.manual_seed(cfg.seed)
    out, ckpt_dir = Path(cfg.output_dir), Path(cfg.checkpoint_dir)
    unet, scheduler = _init_unet(cfg)
    data, labels = fashion_mnist_tensor("train", size=unet.config.sample_size)
    conditional = unet.config.num_class_embeds is not None
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    opt = torch.optim.AdamW(_param_groups(unet, cfg), lr=cfg.lr, weight_decay=0.0)
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
    # What was trained, not just what was asked: with `init` the UNet and scheduler configs come from there.
    effective = {**asdict(cfg), "unet": _public(unet.config), "scheduler": _public(scheduler.config)}
    (ckpt_dir / "config.json").write_text(json.dumps(effective, indent=2))
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
                group["lr"] = lr_at(step) * group["lr_scale"]
            class_labels = labels[idx] if conditional else None
            loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=class_labels).sample, noise)
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
    export(unet, ema, scheduler, out, FASHION_MNIST_CLASSES if conditional else None)
    return out
