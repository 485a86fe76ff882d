"""GET /v1/models: what each served model is and which conditioning fields it takes, for clients that build a
form (the playground) instead of learning it from a 422."""

from __future__ import annotations

from fastapi import APIRouter

from quantizer.diffusion.kinds import read_class_names
from service.deps import Svc
from service.model_info import model_info
from service.schemas import ServedModel

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=list[ServedModel])
async def served_models(svc: Svc) -> list[ServedModel]:
    """Every served model in the order of the settings (the first is the default), from its configs on disk:
    torch-free, so an API-only replica answers it too."""
    out = []
    for name in svc.models:
        path = svc.settings.model_paths[name]
        kind = svc.model_kinds.get(name)
        info = model_info(path)
        classes = kind.num_classes if kind is not None else None
        names = read_class_names(path, classes)
        out.append(ServedModel(name=name, default=name == svc.settings.default_model,
                               kind=None if kind is None else kind.kind, num_classes=classes,
                               class_names=None if names is None else list(names), width=info.width,
                               height=info.height, precisions=list(svc.precisions)))
    return out
