"""The OpenAPI schema states this deployment's limits: served models and precisions as enums, max_steps, max_n.

The request models are static, but what a server accepts depends on its settings; a client (or a generator of test
requests) reading /openapi.json then knows that `steps: 5000` or `model: "sd15"` will be a 422 here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from service.model_info import model_info
from service.settings import ServiceSettings

_JOB_MODELS = ("JobRequest", "GenerateRequest", "ImageGenerationRequest")


def _branch(prop: dict[str, Any] | None, json_type: str) -> dict[str, Any] | None:
    """The part of a property schema that has `json_type` (the property itself, or its anyOf branch)."""
    if prop is None:
        return None
    if prop.get("type") == json_type:
        return prop
    return next((b for b in prop.get("anyOf", ()) if b.get("type") == json_type), None)


def _restrict(prop: dict[str, Any] | None, json_type: str, **keywords: Any) -> None:
    target = _branch(prop, json_type)
    if target is not None:
        target.update(keywords)


def apply_live_limits(schema: dict[str, Any], settings: ServiceSettings, models: list[str],
                      precisions: list[str]) -> dict[str, Any]:
    components = schema.get("components", {}).get("schemas", {})
    for name in (*_JOB_MODELS, "RequantizeRequest"):
        props = components.get(name, {}).get("properties", {})
        _restrict(props.get("model"), "string", enum=list(models))
        _restrict(props.get("precision"), "string", enum=list(precisions))
    for name in _JOB_MODELS:
        props = components.get(name, {}).get("properties", {})
        _restrict(props.get("steps"), "integer", maximum=settings.max_steps)
        _restrict(props.get("n"), "integer", maximum=settings.max_n)
    _restrict_openai_images(components.get("ImageGenerationRequest", {}).get("properties", {}), settings, models)
    return schema


def _restrict_openai_images(props: dict[str, Any], settings: ServiceSettings, models: list[str]) -> None:
    """The sizes the served models generate, and no prompt when none of them takes one."""
    infos = [model_info(settings.model_paths[m]) for m in models if m in settings.model_paths]
    sizes = [i.size for i in infos]
    if infos and None not in sizes:
        _restrict(props.get("size"), "string", enum=[*dict.fromkeys(sizes), "auto"])
    if infos and not any(i.takes_prompt for i in infos):
        _restrict(props.get("prompt"), "string", maxLength=0)


def document_live_limits(app: FastAPI, settings: ServiceSettings, models: list[str], precisions: list[str]) -> None:
    """Wrap app.openapi (which builds and caches the schema once) so the cached schema carries the limits."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        cached = app.openapi_schema is not None
        schema = build()
        return schema if cached else apply_live_limits(schema, settings, models, precisions)

    app.openapi = openapi  # type: ignore[method-assign]
