"""The text fields of a request (prompt, negative_prompt, guidance_scale): checked in one place for every caller,
and the built-in prompts that text-to-image calibration draws from.

Torch-free on purpose, like `quantizer.diffusion.kinds`: the API validates requests with it (422 naming the field)
without loading the ML stack, and the Engine with the same function, so the two can never disagree.
"""

from __future__ import annotations

import functools
from importlib import resources

from quantizer.diffusion.kinds import ModelKind

MAX_PROMPT_CHARS = 500  # the tokenizer truncates at its own limit (77 tokens for CLIP) anyway; this bounds the body
DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers' StableDiffusionPipeline default; calibration runs with it too
MIN_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE = 1.0, 30.0


def check_text_inputs(prompt: str | None, negative_prompt: str | None, guidance_scale: float | None,
                      kind: ModelKind | None) -> None:
    """ValueError naming the field ('prompt: ...') that a request gets wrong for a model of this kind.

    A text-to-image model needs a prompt; any other model takes none of the three fields. kind None: a model not
    known here (the API for a model only its workers can read), so only lengths and ranges are checked.
    """
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{name} must be a string")
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name} must be at most {MAX_PROMPT_CHARS} characters, got {len(text)}")
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or
                                       not MIN_GUIDANCE_SCALE <= float(guidance_scale) <= MAX_GUIDANCE_SCALE):
        raise ValueError(f"guidance_scale must be in [{MIN_GUIDANCE_SCALE:g}, {MAX_GUIDANCE_SCALE:g}], got "
                         f"{guidance_scale!r}")
    if kind is None:
        return
    if kind.takes_prompt:
        if prompt is None:
            raise ValueError("prompt: required for a text-to-image model")
        return
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if value is not None:
            raise ValueError(f"{name}: the model is {kind.described} and takes no prompt")
    if guidance_scale is not None:
        raise ValueError(f"guidance_scale: the model is {kind.described}; classifier-free guidance applies to "
                         "text-to-image models only")


@functools.cache
def builtin_prompts() -> tuple[str, ...]:
    """The calibration prompts shipped with the package (quantizer/data/prompts.txt), one per line."""
    text = resources.files("quantizer.data").joinpath("prompts.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
