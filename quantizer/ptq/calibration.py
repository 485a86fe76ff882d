"""Calibration sets for PTQ4DM: the UNet inputs (x_t, t) whose activations set the quantization ranges.

Step positions follow the sampler's own trajectory: index i counts UNet evaluations from the noise end
(i = 0 is x_T), exactly like quantizer.diffusion.sampling's callback. Trajectory methods generate x_t with the
full-precision model's sampler (quantizer.diffusion.sampling.sample) from pure noise, so the calibration inputs are the
inputs the UNet really sees when generating; each sample has its own seed and is recorded at its own step.
A class-conditional model's samples each get a class label drawn uniformly, fed in their trajectory and in every
calibration forward, so each class's activations are seen. A text-to-image model's samples each get a prompt drawn
from the built-in list (`quantizer.diffusion.prompts`) and run with classifier-free guidance exactly as served (the
default scale, an empty negative prompt): each recorded x_t enters the set twice, with the negative's and with the
prompt's embedding, the two halves of the served 2N pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from quantizer.diffusion.images import non_finite_images
from quantizer.diffusion.kinds import kind_of
from quantizer.diffusion.prompts import builtin_prompts
from quantizer.diffusion.sampling import make_scheduler, sample, sample_shape, validate_request
from quantizer.diffusion.text import PromptEncoder, TextConditioning
from quantizer.ptq.config import CalibrationConfig
from quantizer.ptq.progress import ProgressFn, track
from quantizer.ptq.timestep_draws import TIMESTEP_DRAWS, draw_for

TRAJECTORY_METHODS: tuple[str, ...] = tuple(TIMESTEP_DRAWS)


@dataclass
class CalibrationSet:
    """N calibration inputs. xs: N x C x H x W float32 (CPU); ts: N diffusion time-steps fed with them.

    step_indices: the sampler step each x_t was recorded at (0 = noise end), -1 for 'real_noised'.
    seeds: the seed of each sample's trajectory (quantizer.diffusion.sampling seeds), -1 for 'real_noised'.
    class_labels: N class labels (long) for a class-conditional model, fed with xs; None for an unconditional one.
    encoder_hidden_states: N x L x D text embeddings for a text-to-image model, fed with xs; None otherwise.
    """

    xs: torch.Tensor
    ts: torch.Tensor
    step_indices: torch.Tensor
    seeds: torch.Tensor
    config: CalibrationConfig
    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.xs.shape[0])

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xs, ts, _ in self.inputs(batch_size):
            yield xs, ts

    def inputs(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """(x_t, t, the UNet's other keyword inputs) per batch: what a calibration forward passes the model."""
        size = batch_size or self.config.batch_size
        for start in range(0, len(self), size):
            rows = slice(start, start + size)
            extra = {} if self.class_labels is None else {"class_labels": self.class_labels[rows]}
            if self.encoder_hidden_states is not None:
                extra["encoder_hidden_states"] = self.encoder_hidden_states[rows]
            yield self.xs[rows], self.ts[rows], extra

    def subset(self, mask: torch.Tensor) -> CalibrationSet:
        """The samples `mask` selects (a boolean mask or indices), with everything recorded about them."""
        return CalibrationSet(xs=self.xs[mask], ts=self.ts[mask], step_indices=self.step_indices[mask],
                              seeds=self.seeds[mask], config=self.config,
                              class_labels=None if self.class_labels is None else self.class_labels[mask],
                              encoder_hidden_states=None if self.encoder_hidden_states is None
                              else self.encoder_hidden_states[mask])


class _Collected(Exception):
    """Raised from the sampling callback once every sample of a batch is recorded: ends the trajectory early."""


def sampler_timesteps(scheduler_config: dict, sampler: str, steps: int) -> torch.Tensor:
    """The diffusion time-step of every sampler step, noise end first (what sample() feeds the UNet)."""
    return make_scheduler(sampler, scheduler_config, steps).timesteps.long().clone()


def draw_step_indices(config: CalibrationConfig, timesteps: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampler step index (0 = noise end) of each calibration sample, by the method's registered draw
    (quantizer.ptq.timestep_draws)."""
    return draw_for(config.method).step_indices(config, timesteps, generator)


def build_calibration_set(unet: UNet2DModel, scheduler_config: dict, config: CalibrationConfig,
                          real_images: torch.Tensor | None = None, progress: bool = True,
                          on_progress: ProgressFn | None = None,
                          text_encoder: PromptEncoder | None = None) -> CalibrationSet:
    """Build the calibration set `config` describes with the full-precision `unet`.

    `real_images` (M x C x H x W in model space) is required by 'real_noised' and ignored otherwise.
    `on_progress` hears about the FP trajectories in UNet passes (quantizer.ptq.progress).
    `text_encoder` is required by a text-to-image UNet (its prompts' embeddings), ignored otherwise.
    """
    num_train = int(scheduler_config["num_train_timesteps"])
    validate_request(config.sampler, config.steps, config.eta, config.n_samples, num_train)
    generator = torch.Generator().manual_seed(config.seed)
    shape = sample_shape(unet)
    kind = kind_of(unet.config)
    num_classes = kind.num_classes
    if kind.takes_prompt and (text_encoder is None or config.method not in TIMESTEP_DRAWS):
        raise ValueError("calibration: a text-to-image model calibrates on trajectories (not 'real_noised') and "
                         "needs its text encoder")
    if config.method not in TIMESTEP_DRAWS:  # real_noised: the forward process on real images, no trajectories
        return _real_noised(scheduler_config, config, shape, real_images, generator, num_classes)
    timesteps = sampler_timesteps(scheduler_config, config.sampler, config.steps)
    step_indices = draw_step_indices(config, timesteps, generator)
    seeds = torch.randint(0, 2**31 - 1, (config.n_samples,), generator=generator)
    labels = _draw_labels(num_classes, config.n_samples, generator)  # after the seeds: unconditional sets unchanged
    text = None if text_encoder is None or not kind.takes_prompt else _draw_prompts(text_encoder, config.n_samples,
                                                                                      generator)
    xs = _record_trajectories(unet, scheduler_config, config, step_indices, seeds, labels, shape, progress,
                              on_progress, text)
    bad = non_finite_images(xs)
    if bad:
        first = bad[0]
        raise ValueError(f"calibration: the full-precision {config.sampler}-{config.steps} trajectories hold "
                         f"non-finite x_t (NaN/inf) in {len(bad)} of {len(xs)} samples, first at time-step "
                         f"{int(timesteps[step_indices[first]])} (sampler step {int(step_indices[first])}, seed "
                         f"{int(seeds[first])}): the model diverges before calibration can see it")
    calib = CalibrationSet(xs=xs, ts=timesteps[step_indices], step_indices=step_indices, seeds=seeds, config=config,
                           class_labels=labels)
    return calib if text is None else _with_guidance(calib, text)


def _draw_prompts(text_encoder: PromptEncoder, n: int, generator: torch.Generator) -> TextConditioning:
    """Each calibration sample's prompt, uniform over the built-in list, as served (no negative, default scale)."""
    prompts = builtin_prompts()
    picks = torch.randint(0, len(prompts), (n,), generator=generator)
    return text_encoder.condition([prompts[int(i)] for i in picks])


def _with_guidance(calib: CalibrationSet, text: TextConditioning) -> CalibrationSet:
    """Every x_t twice, with its negative's then its prompt's embedding: the rows a served CFG pass feeds."""
    def twice(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(2, dim=0)

    states = torch.stack([text.uncond, text.cond], dim=1).flatten(0, 1)
    return CalibrationSet(xs=twice(calib.xs), ts=twice(calib.ts), step_indices=twice(calib.step_indices),
                          seeds=twice(calib.seeds), config=calib.config, encoder_hidden_states=states)


def _draw_labels(num_classes: int | None, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """Uniform class labels for a class-conditional model's calibration samples; None for an unconditional one."""
    return None if num_classes is None else torch.randint(0, num_classes, (n,), generator=generator)


def _record_trajectories(unet: UNet2DModel, scheduler_config: dict, config: CalibrationConfig,
                         step_indices: torch.Tensor, seeds: torch.Tensor, labels: torch.Tensor | None,
                         shape: tuple[int, int, int], progress: bool,
                         on_progress: ProgressFn | None = None, text: TextConditioning | None = None) -> torch.Tensor:
    """Run batched FP trajectories, each sample recorded (UNet input) at its own step.

    Samples are batched in order of their step so a batch stops as soon as its deepest sample is recorded,
    before that step's UNet call; sample() seeds each trajectory individually, so batching changes nothing.
    """
    xs = torch.empty(len(seeds), *shape)
    recorded = torch.zeros(len(seeds), dtype=torch.bool)
    order = torch.argsort(step_indices, stable=True)
    chunks = list(order.split(config.batch_size))
    passes = [int(step_indices[idx].max()) + 1 for idx in chunks]  # a batch stops at its deepest sample
    for idx in track(chunks, f"calibration set ({config.method})", "batch", progress, on_progress, passes):
        targets = step_indices[idx]
        last = int(targets.max())

        def record(i: int, total: int, t: int, x: torch.Tensor, idx: torch.Tensor = idx,
                   targets: torch.Tensor = targets, last: int = last) -> None:
            hit = (targets == i).nonzero().flatten()
            if hit.numel():
                xs[idx[hit]] = x[hit].float().cpu()
                recorded[idx[hit]] = True
            if i == last:
                raise _Collected

        with contextlib.suppress(_Collected):
            sample(unet, scheduler_config, seeds[idx].tolist(), sampler=config.sampler, steps=config.steps,
                   eta=config.eta, callback=record, class_labels=None if labels is None else labels[idx].tolist(),
                   text=None if text is None else text.select(idx))
    if not bool(recorded.all()):
        raise RuntimeError("calibration trajectories ended before every sample was recorded")
    return xs


def _real_noised(scheduler_config: dict, config: CalibrationConfig, shape: tuple[int, int, int],
                 real_images: torch.Tensor | None, generator: torch.Generator,
                 num_classes: int | None = None) -> CalibrationSet:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for random real x_0 and t uniform over the training steps."""
    if real_images is None:
        raise ValueError("real_images must be given for calibration method 'real_noised'")
    if real_images.ndim != 4 or tuple(real_images.shape[1:]) != shape:
        raise ValueError(f"real_images must be N x {' x '.join(map(str, shape))}, got {tuple(real_images.shape)}")
    n = config.n_samples
    num_train = int(scheduler_config["num_train_timesteps"])
    picks = torch.randint(0, real_images.shape[0], (n,), generator=generator)
    ts = torch.randint(0, num_train, (n,), generator=generator)
    noise = torch.randn((n, *shape), generator=generator)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    xs = scheduler.add_noise(real_images[picks].float().cpu(), noise, ts)
    missing = torch.full((n,), -1, dtype=torch.long)
    return CalibrationSet(xs=xs, ts=ts, step_indices=missing, seeds=missing.clone(), config=config,
                          class_labels=_draw_labels(num_classes, n, generator))
