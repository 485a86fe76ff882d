"""DDPM/DDIM sampling with diffusers schedulers: a fresh scheduler per call, one seed (and class label) per image;
a latent model's samples are decoded to pixels at the end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch import nn

from quantizer.diffusion.kinds import kind_of, resolve_class_labels
from quantizer.diffusion.latents import decode_latents
from quantizer.diffusion.text import TextConditioning

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# Called before each UNet evaluation with (step index from 0, total steps, timestep, x_t).
# Raising from it stops the generation between two denoising steps (cancellation).
StepCallback = Callable[[int, int, int, torch.Tensor], None]


def validate_request(sampler: str, steps: int, eta: float, n: int, num_train_timesteps: int) -> None:
    """Raise ValueError naming the offending argument."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an integer in 1..{num_train_timesteps}, got {steps!r}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def sample_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    """C x H x W of one sample (diffusers allows an int or an (H, W) sample_size)."""
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(unet.config.in_channels), int(h), int(w))


def make_scheduler(sampler: str, scheduler_config: dict, steps: int) -> DDPMScheduler | DDIMScheduler:
    """Schedulers hold per-run state (timesteps, DDPM's variance bookkeeping): never share one."""
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    scheduler = cls.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T for each image drawn from its own CPU generator, so it is independent of batching and device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    unet: UNet2DModel,
    scheduler_config: dict,
    seeds: Sequence[int],
    sampler: str = "ddim",
    steps: int = 100,
    eta: float = 0.0,
    batch_size: int | None = None,
    callback: StepCallback | None = None,
    class_labels: Sequence[int | None] | None = None,
    decoder: nn.Module | None = None,
    text: TextConditioning | None = None,
) -> torch.Tensor:
    """Generate len(seeds) images in model space ([-1, 1], N x C x H x W, float32 on CPU).

    decoder: a latent model's VAE (`DiffusionModel.decoder`): the UNet samples latents, decoded to pixels per batch
    at the end (`quantizer.diffusion.latents`). Without it a latent UNet's raw latents come back (calibration
    records those). The callback sees the UNet's inputs, latents for a latent model.
    text: a text-to-image UNet's conditioning, one row per image (`PromptEncoder.condition`): each step runs the
    UNet once on 2N inputs (classifier-free guidance); the callback still sees the N images.

    Image k depends only on seeds[k] (and, for a class-conditional model, its class label): its initial noise and
    every stochastic step (DDPM, DDIM eta>0) draw from a generator seeded by it, whatever the batch it lands in.
    class_labels: one per image for a class-conditional UNet; absent (or None entries) are drawn from the image's
    own seed. ValueError naming `class_labels` when out of range, miscounted, or given to an unconditional UNet.
    """
    num_train = int(scheduler_config["num_train_timesteps"])
    validate_request(sampler, steps, eta, len(seeds), num_train)
    kind = kind_of(unet.config)
    labels = resolve_class_labels(seeds, class_labels, kind)
    if kind.takes_prompt != (text is not None):
        raise ValueError("prompt: a text-to-image UNet needs one per image" if kind.takes_prompt else
                         f"prompt: the model is {kind.described} and takes no prompt")
    if text is not None and len(text) != len(seeds):
        raise ValueError(f"prompt: one per image ({len(seeds)}), got {len(text)}")
    if hasattr(unet, "for_steps"):  # a time-step-grouped UNet whose float groups depend on the step count
        unet = unet.for_steps(steps)
    shape = sample_shape(unet)
    batch_size = len(seeds) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, dtype = device_and_dtype(unet)
    outputs = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start: start + batch_size])
        chunk_labels = None if labels is None else labels[start: start + batch_size]
        chunk_text = None if text is None else text.select(slice(start, start + batch_size))
        x = _sample_batch(unet, scheduler_config, chunk, chunk_labels, chunk_text, shape, sampler, steps, eta,
                          device, dtype, callback)
        outputs.append(x if decoder is None else decode_latents(decoder, x))
    return torch.cat(outputs)


def device_and_dtype(unet: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a UNet's inputs go: its own `device`/`dtype` (diffusers models and executors, whose compiled graphs
    may hold no parameters at all), else its first parameter's."""
    if hasattr(unet, "device") and hasattr(unet, "dtype"):
        return torch.device(unet.device), unet.dtype
    param = next(unet.parameters(), None)
    if param is None:
        raise ValueError(f"{type(unet).__name__} has no parameters and no device/dtype: cannot place its inputs")
    return param.device, param.dtype


def _sample_batch(unet: UNet2DModel, scheduler_config: dict, seeds: list[int], labels: list[int] | None,
                  text: TextConditioning | None, shape: tuple[int, int, int], sampler: str, steps: int, eta: float,
                  device: torch.device, dtype: torch.dtype, callback: StepCallback | None) -> torch.Tensor:
    scheduler = make_scheduler(sampler, scheduler_config, steps)
    # The UNet's conditioning besides (x_t, t): the same for every step.
    extra = {} if labels is None else {"class_labels": torch.tensor(labels, dtype=torch.long, device=device)}
    if text is not None:
        extra = {"encoder_hidden_states": text.unet_inputs().to(device=device, dtype=dtype)}
    # Offset the step-noise stream from the x_T stream so the two never coincide.
    generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]
    x = initial_noise(seeds, shape)
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        if callback is not None:
            callback(i, len(timesteps), int(t), x)
        model_in = x.to(device=device, dtype=dtype)
        if text is not None:  # classifier-free guidance: [uncond; cond] in one pass
            model_in = torch.cat([model_in, model_in])
        eps = unet(model_in, t.to(device), **extra).sample.float().cpu()
        if text is not None:
            eps = text.guide(eps)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        x = scheduler.step(eps, t, x, generator=generators, **kwargs).prev_sample
    return x
