"""Where along the sampler's trajectory each calibration sample is recorded: one small class per trajectory
calibration method, chosen by name through a registry (as torchao picks behaviour by config type), so a new
method is a class here and nowhere else.

Step indices count UNet evaluations from the noise end (0 = x_T), like quantizer.diffusion.sampling's callback.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from quantizer.ptq.config import CalibrationConfig


class TimestepDraw(ABC):
    """Draws the sampler step index of each of `config.n_samples` calibration samples."""

    name: ClassVar[str]

    @abstractmethod
    def step_indices(self, config: CalibrationConfig, timesteps: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """N long step indices into `timesteps` (the sampler's own schedule, noise end first)."""


TIMESTEP_DRAWS: dict[str, TimestepDraw] = {}


def register(cls: type[TimestepDraw]) -> type[TimestepDraw]:
    TIMESTEP_DRAWS[cls.name] = cls()
    return cls


def draw_for(method: str) -> TimestepDraw:
    """The draw of a trajectory method; ValueError for a method that builds its set another way."""
    try:
        return TIMESTEP_DRAWS[method]
    except KeyError:
        raise ValueError(f"method {method!r} does not sample time-steps along a trajectory "
                         f"(trajectory methods: {', '.join(TIMESTEP_DRAWS)})") from None


@register
class NDTC(TimestepDraw):
    """The paper's Normally Distributed Time-step Calibration: position from the image (x_0) end
    ~ round(Normal(mu * steps, sigma * steps)), clipped to the trajectory. Rounds to the nearest step (the
    authors' code truncates; at most one step apart)."""

    name = "ndtc"
    from_image_end: ClassVar[bool] = True

    def step_indices(self, config: CalibrationConfig, timesteps: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        steps = len(timesteps)
        draw = torch.normal(config.mu * steps, config.sigma * steps, (config.n_samples,), generator=generator,
                            dtype=torch.float64)
        position = draw.round().clamp(0, steps - 1).long()
        return steps - 1 - position if self.from_image_end else position


@register
class NDTCCode(NDTC):
    """The same draw counted from the noise end: what the authors' released code does."""

    name = "ndtc_code"
    from_image_end = False


@register
class Uniform(TimestepDraw):
    """Positions evenly spaced over the trajectory (Q-Diffusion style)."""

    name = "uniform"

    def step_indices(self, config: CalibrationConfig, timesteps: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        return torch.linspace(0, len(timesteps) - 1, config.n_samples, dtype=torch.float64).round().long()


@register
class SingleStep(TimestepDraw):
    """Every sample at one time-step (the classical single-time-step PTQ baseline): `single_step_t`, or the
    middle of the trajectory; the sampler step nearest to it."""

    name = "single_step"

    def step_indices(self, config: CalibrationConfig, timesteps: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        target = timesteps[len(timesteps) // 2] if config.single_step_t is None else config.single_step_t
        index = int((timesteps - target).abs().argmin())
        return torch.full((config.n_samples,), index, dtype=torch.long)


