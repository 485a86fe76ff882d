"""What the API knows about each served model without loading it: its kind and number of classes.

Read from the model's config on disk (`quantizer.diffusion.kinds`, torch-free), so `class_labels` are checked at
submission with a 422 instead of failing in a worker. A model this process cannot read (a hub id, a path only the
workers see) is None: its labels are checked for count and sign here, and against the model by the worker.
"""

from __future__ import annotations

import logging

from quantizer.diffusion.kinds import ModelKind, read_kind

log = logging.getLogger(__name__)


def served_model_kinds(model_paths: dict[str, str]) -> dict[str, ModelKind | None]:
    """Model name -> its kind; ValueError for a model of a kind that cannot be served (text-to-image)."""
    kinds: dict[str, ModelKind | None] = {}
    for name, path in model_paths.items():
        try:
            kinds[name] = read_kind(path)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from exc
        if kinds[name] is None:
            log.info("model %s: no config readable at %s here; its class labels are checked by the workers", name,
                     path)
    return kinds
