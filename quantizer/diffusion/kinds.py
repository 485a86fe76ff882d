"""What kind of diffusion model a directory holds, which class labels it takes and the size of the images it
makes, from its JSON configs alone.

Torch-free on purpose: the API process validates `class_labels` with it without loading the ML stack, and the
library validates them with the same functions, so the two can never disagree. The model directories themselves
are resolved here too (the built-in name -> the committed folder) for the same reason.
"""

from __future__ import annotations

import json
import operator
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from quantizer.constants import BUILTIN_MODEL_NAME

# The checkout's models/ by default; an installed wheel has no checkout, so images set PTQ4DM_MODELS_DIR.
MODELS_DIR = Path(os.environ.get("PTQ4DM_MODELS_DIR") or Path(__file__).resolve().parents[2] / "models")
BUILTIN_MODEL_DIR = MODELS_DIR / BUILTIN_MODEL_NAME

UNCONDITIONAL = "unconditional"
CLASS_CONDITIONAL = "class-conditional"
LATENT = "latent"  # an unconditional UNet2DModel in a VAE's latent space (diffusers' LDMPipeline layout)
TEXT_TO_IMAGE = "text-to-image"  # a UNet2DConditionModel with a CLIP text encoder and a VAE (StableDiffusionPipeline)
MODEL_KINDS: tuple[str, ...] = (UNCONDITIONAL, CLASS_CONDITIONAL, LATENT, TEXT_TO_IMAGE)
# diffusers' class-embedding types whose labels are integers 0..num_class_embeds-1 (None: an embedding table).
_INTEGER_CLASS_EMBEDS: tuple[str | None, ...] = (None, "timestep")
# model_index.json components that hold a latent decoder, and the decoder classes that can decode them.
LATENT_COMPONENTS: tuple[str, ...] = ("vqvae", "vae")
DECODER_CLASSES: tuple[str, ...] = ("VQModel", "AutoencoderKL")
# What a text-to-image pipeline needs beside its UNet and VAE: component -> the classes that can fill it.
TEXT_COMPONENTS: dict[str, tuple[str, ...]] = {"text_encoder": ("CLIPTextModel",),
                                               "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast")}


@dataclass(frozen=True)
class ModelKind:
    """unconditional, class-conditional with `num_classes` labels 0..num_classes-1, latent (unconditional, with a
    decoder from latents to pixels), or text-to-image (latent, conditioned on a prompt)."""

    kind: str = UNCONDITIONAL
    num_classes: int | None = None

    @property
    def class_conditional(self) -> bool:
        return self.kind == CLASS_CONDITIONAL

    @property
    def latent(self) -> bool:
        """Samples latents that a decoder turns into pixels."""
        return self.kind in (LATENT, TEXT_TO_IMAGE)

    @property
    def takes_prompt(self) -> bool:
        return self.kind == TEXT_TO_IMAGE

    @property
    def described(self) -> str:
        """How error messages name it: 'the model is <described>'."""
        return "an unconditional latent model" if self.kind == LATENT else self.kind


def _is_model_dir(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file()


def builtin_model_names() -> list[str]:
    """The models committed under MODELS_DIR (a folder with a unet/ config): each is served by its folder name."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if _is_model_dir(p))


def resolve_model_path(name_or_path: str | Path | None) -> str:
    """None and the built-in name map to the committed directory, as always; the other folders under MODELS_DIR
    (e.g. 'fashion-mnist-ddpm-cond') are found by name too, unless a local directory of that name exists in the
    working directory (which wins, as it would without this mapping); anything else is passed through (a local
    path or a hub id)."""
    if name_or_path is None or str(name_or_path) == BUILTIN_MODEL_NAME:
        if not BUILTIN_MODEL_DIR.is_dir():  # otherwise diffusers would take the path for a hub id
            raise ValueError(f"model: built-in weights not found at {BUILTIN_MODEL_DIR}; set PTQ4DM_MODELS_DIR")
        return str(BUILTIN_MODEL_DIR)
    name = str(name_or_path)
    if "/" not in name and not Path(name).exists() and _is_model_dir(MODELS_DIR / name):
        return str(MODELS_DIR / name)
    return name


def kind_of(unet_config: Mapping) -> ModelKind:
    """The kind a UNet config describes; ValueError for a UNet this project cannot serve yet."""
    class_name = unet_config.get("_class_name")
    # A UNet built in memory has no _class_name in its config; cross-attention tells the conditional one apart.
    if class_name == "UNet2DConditionModel" or (class_name is None and "cross_attention_dim" in unet_config):
        for name in ("class_embed_type", "addition_embed_type", "num_class_embeds"):
            if unet_config.get(name) is not None:
                raise ValueError(f"model: text-to-image UNets with {name}={unet_config[name]!r} are not supported "
                                 "yet; ptq4dm serves Stable Diffusion 1.x/2.x-style UNet2DConditionModels")
        return ModelKind(TEXT_TO_IMAGE)
    if class_name not in (None, "UNet2DModel"):
        raise ValueError(f"model: UNet class {class_name} is not supported yet; ptq4dm serves UNet2DModel and "
                         "UNet2DConditionModel")
    embed_type, classes = unet_config.get("class_embed_type"), unet_config.get("num_class_embeds")
    if embed_type is None and classes is None:
        return ModelKind(UNCONDITIONAL)
    if embed_type in _INTEGER_CLASS_EMBEDS and isinstance(classes, int) and classes >= 1:
        return ModelKind(CLASS_CONDITIONAL, classes)
    raise ValueError(f"model: class_embed_type={embed_type!r} with num_class_embeds={classes!r} is not supported "
                     "yet; class-conditional models need num_class_embeds (the number of classes) and "
                     "class_embed_type null or 'timestep'")


def pipeline_index(directory: Path) -> dict | None:
    """model_index.json of a diffusers pipeline folder; None for a bare UNet folder."""
    index = directory / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else None


def latent_decoder(components: Mapping | None) -> tuple[str, str] | None:
    """(component, class) of the decoder a pipeline index names ('vqvae', 'VQModel'), None for a pixel-space
    pipeline; ValueError for a UNet or decoder class this project cannot serve."""
    if components is None:
        return None
    unet = components.get("unet")
    if isinstance(unet, list) and len(unet) == 2 and kind_of({"_class_name": unet[1]}).takes_prompt:
        for name, classes in TEXT_COMPONENTS.items():
            entry = components.get(name)
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in classes):
                raise ValueError(f"model: a text-to-image pipeline needs {name} ({' or '.join(classes)}), got "
                                 f"{entry!r}")
    for name in LATENT_COMPONENTS:
        entry = components.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
            if entry[1] not in DECODER_CLASSES:
                raise ValueError(f"model: latent decoder {name}={entry[1]} is not supported yet; latent models need "
                                 f"one of {', '.join(DECODER_CLASSES)}")
            return name, str(entry[1])
    return None


def check_pipeline(directory: Path) -> tuple[str, str] | None:
    """The latent decoder (component, class) of a pipeline folder, None for a pixel-space one or a bare UNet
    folder; ValueError for a pipeline this project cannot serve."""
    return latent_decoder(pipeline_index(directory))


def pipeline_kind(unet_config: Mapping, decoder: tuple[str, str] | None) -> ModelKind:
    """The kind of a UNet (its config) with or without a latent decoder beside it."""
    kind = kind_of(unet_config)
    if kind.takes_prompt and decoder is None:
        raise ValueError("model: text-to-image models need the StableDiffusionPipeline layout (unet, vae, "
                         "text_encoder, tokenizer, scheduler and model_index.json); pixel-space ones are not "
                         "supported yet")
    if decoder is None or kind.takes_prompt:
        return kind
    if kind.class_conditional:
        raise ValueError("model: class-conditional latent models are not supported yet; ptq4dm serves "
                         "unconditional latent UNet2DModels")
    return ModelKind(LATENT)


def unet_config_path(directory: Path) -> Path | None:
    """The UNet's config.json in the pipeline layout (unet/) or a bare UNet folder; None when neither exists."""
    for path in (directory / "unet" / "config.json", directory / "config.json"):
        if path.is_file():
            return path
    return None


def read_kind(name_or_path: str | Path | None) -> ModelKind | None:
    """The kind of a local model directory (or the built-in name); None when it is not one here (a hub id, or a
    path this process cannot see: then only the workers know). ValueError for a model that is not supported."""
    try:
        directory = Path(resolve_model_path(name_or_path))
    except ValueError:  # the built-in weights are not installed in this process's filesystem
        return None
    config = unet_config_path(directory) if directory.is_dir() else None
    if config is None:
        return None
    return pipeline_kind(json.loads(config.read_text()), check_pipeline(directory))


def image_size(name_or_path: str | Path | None) -> tuple[int, int] | None:
    """(height, width) of the images a local model makes, None where it is not readable here. A latent model's
    are its UNet's sample_size times the decoder's upsampling, 2^(len(block_out_channels)-1) as in diffusers'
    VQModel and AutoencoderKL (one downsampling per encoder block but the last)."""
    try:
        directory = Path(resolve_model_path(name_or_path))
    except ValueError:
        return None
    config = unet_config_path(directory) if directory.is_dir() else None
    if config is None:
        return None
    size = json.loads(config.read_text()).get("sample_size")
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    decoder = check_pipeline(directory)
    if decoder is None:
        return height, width
    decoder_config = json.loads((directory / decoder[0] / "config.json").read_text())
    factor = 2 ** (len(decoder_config.get("block_out_channels") or (64,)) - 1)
    return height * factor, width * factor


def read_class_names(name_or_path: str | Path | None, num_classes: int | None) -> tuple[str, ...] | None:
    """The names of classes 0..num_classes-1 from model_index.json's `id2label` (diffusers' DiTPipeline keeps them
    there), so a client can offer "Dress" instead of 3; None where the model has none, or none that fit its classes
    (names are a convenience: a malformed map never stops a model from being served)."""
    if not num_classes:
        return None
    try:
        index = pipeline_index(Path(resolve_model_path(name_or_path)))
    except (ValueError, OSError):  # not installed here, unreadable, or not JSON
        return None
    id2label = (index or {}).get("id2label")
    if not isinstance(id2label, Mapping) or set(id2label) != {str(k) for k in range(num_classes)}:
        return None
    names = tuple(id2label[str(k)] for k in range(num_classes))
    return names if all(isinstance(name, str) and name for name in names) else None


def class_names_index(names: Sequence[str]) -> dict:
    """The model_index.json that `read_class_names` reads, for a pixel-space class-conditional folder (unet/ and
    scheduler/, as DDPMPipeline lays them out) whose labels have names."""
    return {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDPMScheduler"], "id2label": {str(k): name for k, name in enumerate(names)}}


def default_class_label(seed: int, num_classes: int) -> int:
    """The class of an image whose request names none: drawn from its own seed alone (so image k still depends only
    on seeds[k], whatever batch it lands in)."""
    return random.Random(int(seed)).randrange(num_classes)


def check_class_labels(class_labels: Sequence[int | None] | None, n: int,
                       kind: ModelKind | None) -> list[int | None] | None:
    """`class_labels` as plain ints (None entries kept), or ValueError naming `class_labels`.

    One label per image, each in 0..num_classes-1; an unconditional model takes none. kind None: the model is not
    known here (the API for a model only its workers can read), so only the count and the sign are checked.
    """
    if class_labels is None:
        return None
    if kind is not None and not kind.class_conditional:
        raise ValueError(f"class_labels: the model is {kind.described} and takes no class labels")
    labels = list(class_labels)
    if len(labels) != n:
        raise ValueError(f"class_labels must hold one label per image ({n}), got {len(labels)}")
    limit = None if kind is None else kind.num_classes
    allowed = "integers >= 0" if limit is None else f"integers in 0..{limit - 1} (the model's classes)"
    out: list[int | None] = []
    for label in labels:
        try:
            value = None if label is None else operator.index(label)
        except TypeError:
            value = -1
        if isinstance(label, bool) or (value is not None and not 0 <= value < (limit or value + 1)):
            raise ValueError(f"class_labels must be {allowed}, got {label!r}")
        out.append(value)
    return out


def resolve_class_labels(seeds: Sequence[int], class_labels: Sequence[int | None] | None,
                         kind: ModelKind) -> list[int] | None:
    """The label of every image: as given, or (None, or an entry None) drawn from its seed; None for an
    unconditional model. ValueError naming `class_labels` for labels the model does not take."""
    labels = check_class_labels(class_labels, len(seeds), kind)
    if not kind.class_conditional:
        return None
    labels = labels or [None] * len(seeds)
    return [default_class_label(seed, kind.num_classes) if label is None else label
            for seed, label in zip(seeds, labels, strict=True)]
