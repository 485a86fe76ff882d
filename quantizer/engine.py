"""The one boundary between the ML core and the service: load a model, quantize it, warm it up, generate images.

The worker holds Engines and asks them for uint8 images; it never touches UNets, schedulers or tensors. An Engine
is immutable: `quantize` and `compile` return new ones, so a batch that holds an Engine never sees a swap.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from quantizer.diffusion.images import non_finite_images, to_uint8
from quantizer.diffusion.kinds import ModelKind, check_class_labels, resolve_class_labels
from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.prompts import check_text_inputs
from quantizer.diffusion.sampling import StepCallback, sample, validate_request
from quantizer.diffusion.text import TextConditioning
from quantizer.ptq.cache import hash_state_dict
from quantizer.ptq.progress import ProgressFn


@dataclass(frozen=True)
class Generation:
    """PNG-ready images, N x H x W x C uint8 in seed order. A row listed in `non_finite` came out with NaN/inf (the
    model diverged for that seed): it is left blank and must not be served."""

    images: np.ndarray
    non_finite: tuple[int, ...] = ()
    class_labels: tuple[int, ...] | None = None  # the class of each image (a class-conditional model), as run


@dataclass(frozen=True)
class Engine:
    """One model at one precision, ready to generate.

    model: the full-precision model as loaded (every quantized variant is built from it).
    digest: sha256 of its weights (identifies the model in versions): the UNet's, with a latent model's decoder.
    unet: what runs: model.unet for fp32, else the quantized UNet on its execution backend.
    """

    model: DiffusionModel
    digest: str
    unet: nn.Module
    precision: str = "fp32"
    backend: str = "eager"
    calibration_hash: str | None = None
    cache_hit: bool | None = None  # quantized only: stats were read (shipped or cached), not calibrated
    stats_source: str | None = None  # quantized only: shipped | cache | calibrated

    @classmethod
    def load(cls, name_or_path: str | Path, device: str = "cpu") -> Engine:
        """The fp32 engine of a built-in name, local diffusers directory or hub id."""
        model = load_model(name_or_path, device=device)
        return cls(model, model_digest(model), model.unet)

    @property
    def scheduler_config(self) -> dict:
        return self.model.scheduler_config

    @property
    def num_train_timesteps(self) -> int:
        return self.model.num_train_timesteps

    @property
    def model_kind(self) -> ModelKind:
        """unconditional, class-conditional with its number of classes, or latent."""
        return self.model.model_kind

    @property
    def decoder(self) -> nn.Module | None:
        """A latent model's VAE: fp32 eager at every precision (only the UNet is quantized)."""
        return self.model.decoder

    def quantize(self, precision: str, config: Mapping[str, Any], cache_dir: str | Path | None,
                 on_progress: ProgressFn | None = None) -> Engine:
        """The model quantized to `precision` (PTQ4DM, `quantize_model`), still in fake quant until `compile`.

        Always starts from the full-precision model, whatever this engine's precision. The stats come from the
        model's shipped calibration, the cache in `cache_dir`, or a calibration run reported to `on_progress`.
        """
        if precision == "fp32":
            raise ValueError("precision: fp32 is the loaded model itself; quantize takes a quantized precision")
        from quantizer.ptq.pipeline import quantize_model  # the calibration stack, only where it is used

        result = quantize_model(self.model, precision, dict(config), cache_dir, progress=False,
                                on_progress=on_progress)
        return replace(self, unet=result.unet, precision=precision, backend="fake",
                       calibration_hash=result.calibration_hash, cache_hit=bool(result.cache_hit),
                       stats_source=result.stats_source)

    def compile(self, backend: str, max_batch: int, cache_dir: str | None = None) -> Engine:
        """This engine on an execution backend (`quantizer.execution.build_executor`: real int8 kernels where the
        CPU has them); graphs compile lazily, or in `warm`."""
        from quantizer.execution.executor import build_executor

        unet = build_executor(self.unet, backend, max_batch=max_batch, cache_dir=cache_dir)
        return replace(self, unet=unet, backend=getattr(unet, "backend", "fake"))

    def warm(self, batch_sizes: Iterable[int] = (1,)) -> object:
        """Compile the graphs for `batch_sizes` (backends with one dynamic-batch graph compile once) and run one
        tiny generation, so the first request does not pay for lazy initialisation. Returns the backend's
        compile report (seconds per size), or None when nothing compiles."""
        report = self.unet.warmup(list(batch_sizes)) if hasattr(self.unet, "warmup") else None
        text = self._condition([0], [""] if self.model_kind.takes_prompt else None, None, None)
        sample(self.unet, self.scheduler_config, [0], sampler="ddim", steps=1, decoder=self.decoder, text=text)
        return report

    def validate(self, sampler: str, steps: int, eta: float, n: int,
                 class_labels: Sequence[int | None] | None = None, prompt: str | None = None,
                 negative_prompt: str | None = None, guidance_scale: float | None = None) -> None:
        """ValueError naming the field a request gets wrong for this model (e.g. steps beyond its T, a class label
        beyond its classes, class labels for an unconditional model, a prompt missing or given to a model that
        takes none)."""
        validate_request(sampler, steps, eta, n, self.num_train_timesteps)
        check_class_labels(class_labels, n, self.model_kind)
        check_text_inputs(prompt, negative_prompt, guidance_scale, self.model_kind)

    def _condition(self, seeds: Sequence[int], prompts: Sequence[str] | None,
                   negative_prompts: Sequence[str | None] | None,
                   guidance_scales: Sequence[float | None] | None) -> TextConditioning | None:
        """A text-to-image model's per-image conditioning (fp32 text encoder); ValueError naming `prompt` when a
        model gets prompts it does not take, or none that it needs."""
        if not self.model_kind.takes_prompt:
            if prompts is not None or negative_prompts is not None or guidance_scales is not None:
                raise ValueError(f"prompt: the model is {self.model_kind.described} and takes no prompt")
            return None
        if prompts is None or len(prompts) != len(seeds):
            raise ValueError(f"prompt: a text-to-image model needs one per image ({len(seeds)})")
        return self.model.text_encoder.condition(prompts, negative_prompts, guidance_scales)

    def generate(self, seeds: Sequence[int], sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                 on_step: StepCallback | None = None,
                 class_labels: Sequence[int | None] | None = None, prompts: Sequence[str] | None = None,
                 negative_prompts: Sequence[str | None] | None = None,
                 guidance_scales: Sequence[float | None] | None = None) -> Generation:
        """One image per seed in one batch; image k depends only on seeds[k] (and its class label or prompt).
        `on_step` runs before each denoising step, and an exception raised from it stops the generation there
        (cancellation).

        class_labels: one per image for a class-conditional model; absent ones (None) are drawn from their seed.
        prompts (required), negative_prompts and guidance_scales: one per image for a text-to-image model (None
        entries: '' and the default scale).
        """
        labels = resolve_class_labels(list(seeds), class_labels, self.model_kind)
        text = self._condition(seeds, prompts, negative_prompts, guidance_scales)
        x = sample(self.unet, self.scheduler_config, list(seeds), sampler=sampler, steps=steps, eta=eta,
                   batch_size=len(seeds), callback=on_step, class_labels=labels, decoder=self.decoder, text=text)
        bad = non_finite_images(x)
        n, c, h, w = x.shape
        images = np.zeros((n, h, w, c), dtype=np.uint8)
        keep = sorted(set(range(n)) - set(bad))
        if keep:
            images[keep] = to_uint8(x[keep])
        return Generation(images, tuple(bad), None if labels is None else tuple(labels))


def model_digest(model: DiffusionModel) -> str:
    """sha256 of what the images depend on: the UNet's weights, and a latent model's decoder's (and text encoder's)
    beside them (the calibration cache keys on the UNet, which is what PTQ4DM quantizes)."""
    unet = hash_state_dict(model.unet)
    others = [m for m in (model.decoder, model.text_encoder) if m is not None]
    if not others:
        return unet
    return hashlib.sha256("|".join([unet, *map(hash_state_dict, others)]).encode()).hexdigest()
