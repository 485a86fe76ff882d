"""Noise correction (PTQD, He et al. 2023): remove the predictable part of the quantized UNet's noise error.

The quantized UNet's noise estimate is eps_q = eps + delta. Part of delta is systematic: a per-channel offset
("bias") and a part proportional to eps itself, delta ~ k eps + b + r. Both are estimated per bucket of diffusion
time on full-precision trajectories by running the FP and the quantized UNet on the same x_t, and undone at
sampling time: eps_hat = (eps_q - b) / (1 + k). 'bias' fits b only (k = 0); 'ptqd' fits k and b jointly.

Why a wrapper outside the executed UNet: the correction is two small tensors per bucket applied to the UNet's
output, so it is the same whatever backend (simulation, OpenVINO, int8 graphs) computes eps_q;
`NoiseCorrectedUNet.map` rebuilds it around an executed UNet.

Buckets are fixed in diffusion time (CORRECTION_BUCKETS equal buckets of [0, T)), not in sampler steps, so one
estimate serves every sampler and step count (a bucket no recorded step falls in is left uncorrected). It applies
to every sampler, DDIM (eta = 0) included: it only changes the noise estimate. PTQD's second half, the "variance
schedule calibration" (lower the sampler's posterior noise by the residual r's variance), only applies to
stochastic samplers (DDPM, DDIM eta > 0) and is not implemented: diffusers' DDPMScheduler computes and draws its
posterior noise inside `step()` from its own betas, so it would need a sampler-side hook, not a UNet wrapper.
`residual_var` is estimated and stored so its size can be judged (docs/SENSITIVITY.md).

Cost: CORRECTION_TRAJECTORIES FP trajectories of the calibration sampler, every step recorded (steps x batch
CORRECTION_TRAJECTORIES FP passes), then one quantized pass over the same inputs. The result is cached beside the
calibration statistics (quantizer.ptq.pipeline), so a cache hit costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from quantizer.diffusion.kinds import kind_of
from quantizer.diffusion.sampling import sample
from quantizer.diffusion.text import PromptEncoder
from quantizer.ptq.config import NOISE_CORRECTIONS, CalibrationConfig
from quantizer.ptq.progress import ProgressFn, track
from quantizer.ptq.timestep_groups import group_edges, group_index

CORRECTION_BUCKETS = 10
CORRECTION_TRAJECTORIES = 16
PREFIX = "noise_correction"
# Offsets the seeds of the correction trajectories from the calibration set's (same config seed, other stream).
_SEED_STREAM = 7_919


@dataclass
class CorrectionPairs:
    """FP UNet inputs and outputs recorded along FP trajectories: one entry per sampler step (one t each).

    extras: the UNet's other keyword inputs of that step (class labels, text embeddings), fed to the quantized UNet.
    """

    xs: list[torch.Tensor]
    ts: list[int]
    eps: list[torch.Tensor]
    extras: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return sum(int(x.shape[0]) for x in self.xs)


class _Recorder(nn.Module):
    """The FP UNet, recording every call's inputs and output (sample() sees the UNet itself)."""

    def __init__(self, unet: nn.Module, pairs: CorrectionPairs) -> None:
        super().__init__()
        self.unet, self.pairs = unet, pairs
        self.config = unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: torch.Tensor) -> UNet2DOutput:
        out = self.unet(sample, timestep, **kwargs)
        self.pairs.xs.append(sample.detach().float().cpu())
        self.pairs.ts.append(int(torch.as_tensor(timestep).reshape(-1)[0]))
        self.pairs.eps.append(out.sample.detach().float().cpu())
        self.pairs.extras.append({k: v.detach().cpu() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return out


def record_pairs(unet: nn.Module, scheduler_config: dict, calibration: CalibrationConfig,
                 n_trajectories: int = CORRECTION_TRAJECTORIES, text_encoder: PromptEncoder | None = None,
                 on_progress: ProgressFn | None = None) -> CorrectionPairs:
    """Every step of n_trajectories FP trajectories of the calibration sampler, on seeds of their own (drawn from
    the calibration seed's own stream, so neither the calibration set's nor the usual evaluation seeds 0..N)."""
    generator = torch.Generator().manual_seed(calibration.seed * 1_000_003 + _SEED_STREAM)
    seeds = torch.randint(0, 2**31 - 1, (n_trajectories,), generator=generator).tolist()
    text = None
    if kind_of(unet.config).takes_prompt:
        if text_encoder is None:
            raise ValueError("noise_correction: a text-to-image model needs its text encoder")
        from quantizer.ptq.calibration import _draw_prompts  # the calibration set's prompt draw, served guidance

        text = _draw_prompts(text_encoder, n_trajectories, generator)

    def report(i: int, total: int, t: int, x: torch.Tensor) -> None:
        if on_progress is not None:
            on_progress("noise-correction trajectories", i, total)

    pairs = CorrectionPairs([], [], [], [])
    sample(_Recorder(unet, pairs), scheduler_config, seeds, sampler=calibration.sampler, steps=calibration.steps,
           eta=calibration.eta, text=text, callback=report)
    return pairs


@torch.no_grad()
def estimate(quantized: nn.Module, pairs: CorrectionPairs, num_train_timesteps: int, mode: str,
             buckets: int = CORRECTION_BUCKETS, progress: bool = False,
             on_progress: ProgressFn | None = None) -> dict[str, torch.Tensor]:
    """Correction statistics of `quantized` on `pairs` (the cache's flat format, keys under PREFIX).

    Per bucket: bias (C,) and scale = 1 + k, from a least-squares fit delta_c = k eps_c + b_c (k shared by the
    channels, b per channel; k = 0 for 'bias'); residual_var: the mean square of what the fit leaves (r).
    """
    if mode not in NOISE_CORRECTIONS[1:]:
        raise ValueError(f"noise_correction must be one of {', '.join(NOISE_CORRECTIONS[1:])} here, got {mode!r}")
    edges = group_edges(num_train_timesteps, buckets)
    channels = int(pairs.eps[0].shape[1])
    n = torch.zeros(buckets, dtype=torch.float64)
    sums = {name: torch.zeros(buckets, channels, dtype=torch.float64) for name in ("e", "d", "ee", "ed", "dd")}
    device = getattr(quantized, "device", torch.device("cpu"))
    for x, t, eps, extra in track(list(zip(pairs.xs, pairs.ts, pairs.eps, pairs.extras, strict=True)),
                                  "noise-correction statistics", "step", progress, on_progress):
        extra_on = {k: v.to(device) for k, v in extra.items()}
        eps_q = quantized(x.to(device), torch.tensor(t, device=device), **extra_on).sample.float().cpu()
        e, d = eps.double(), (eps_q - eps).double()
        b = int(group_index(torch.tensor(t), edges))
        n[b] += e.numel() / channels
        for name, value in (("e", e), ("d", d), ("ee", e * e), ("ed", e * d), ("dd", d * d)):
            sums[name][b] += value.transpose(0, 1).reshape(channels, -1).sum(dim=1)
    return fit(n, sums, mode, edges)


def fit(n: torch.Tensor, sums: dict[str, torch.Tensor], mode: str, edges: list[int]) -> dict[str, torch.Tensor]:
    """Per-bucket k and b from the sufficient statistics (sums of e, d, e^2, e d, d^2 per channel, n per channel);
    an empty bucket or one where eps does not vary stays the identity."""
    count = n.clamp(min=1)[:, None]
    mean_e, mean_d = sums["e"] / count, sums["d"] / count
    var_e = sums["ee"] / count - mean_e**2
    cov = sums["ed"] / count - mean_e * mean_d
    var_d = sums["dd"] / count - mean_d**2
    k = torch.zeros(len(n), dtype=torch.float64)
    if mode == "ptqd":
        denominator = var_e.sum(dim=1)
        k = torch.where(denominator > 0, cov.sum(dim=1) / denominator.clamp(min=1e-30), k)
        k = torch.where((1 + k) > 0.1, k, torch.zeros_like(k))  # never divide by ~0 or flip the sign
    bias = mean_d - k[:, None] * mean_e
    residual = (var_d - 2 * k[:, None] * cov + k[:, None] ** 2 * var_e).mean(dim=1)
    empty = n == 0
    k, bias, residual = k.masked_fill(empty, 0), bias.masked_fill(empty[:, None], 0), residual.masked_fill(empty, 0)
    return {f"{PREFIX}.edges": torch.tensor(edges, dtype=torch.int64),
            f"{PREFIX}.scale": (1 + k).float(), f"{PREFIX}.bias": bias.float(),
            f"{PREFIX}.residual_var": residual.clamp(min=0).float(), f"{PREFIX}.count": n.float()}


def has_correction(stats: dict[str, torch.Tensor]) -> bool:
    return f"{PREFIX}.scale" in stats


class NoiseCorrectedUNet(nn.Module):
    """A UNet (fake-quant, grouped or executed) whose noise estimate is corrected per bucket of t; called like a
    UNet2DModel: unet(x_t, t, ...).sample, with `.config`, `.dtype`, `.device`."""

    def __init__(self, unet: nn.Module, stats: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.stats = {k: v for k, v in stats.items() if k.startswith(f"{PREFIX}.")}
        self.edges = [int(e) for e in self.stats[f"{PREFIX}.edges"]]
        self.register_buffer("scale", self.stats[f"{PREFIX}.scale"].float().clone(), persistent=False)
        self.register_buffer("bias", self.stats[f"{PREFIX}.bias"].float().clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.unet, "dtype", torch.float32)

    @property
    def device(self) -> torch.device:
        return getattr(self.unet, "device", torch.device("cpu"))

    @property
    def backend(self) -> str:
        return getattr(self.unet, "backend", "fake")

    def map(self, build: Callable[[nn.Module], nn.Module]) -> NoiseCorrectedUNet:
        """The same correction around build(unet) (e.g. the UNet compiled by a backend)."""
        return NoiseCorrectedUNet(build(self.unet), self.stats)

    def warmup(self, batch_sizes: Iterable[int] = (1,)) -> dict[int, float]:
        return self.unet.warmup(batch_sizes) if hasattr(self.unet, "warmup") else {}

    def weight_bytes(self) -> int:
        from quantizer.execution.executor import weight_bytes

        return weight_bytes(self.unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True,
                **kwargs: object) -> UNet2DOutput | tuple[torch.Tensor]:
        out = self.unet(sample, timestep, **kwargs).sample
        buckets = group_index(torch.as_tensor(timestep).reshape(-1), self.edges).expand(out.shape[0])
        scale = self.scale[buckets].to(out.device, out.dtype)
        bias = self.bias[buckets].to(out.device, out.dtype)
        out = (out - bias[:, :, None, None]) / scale[:, None, None, None]
        return UNet2DOutput(sample=out) if return_dict else (out,)
