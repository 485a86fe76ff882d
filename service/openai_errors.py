"""OpenAI's error shape for the OpenAI-compatible routes, built from the app's own error handlers.

The app answers every error as `{"detail": ...}` (service.errors, service.api). A route using `OpenAIErrorRoute`
runs the same handler for an exception its endpoint raises (so statuses, headers such as Retry-After and metrics stay
the same) and rewrites only the body: `{"error": {"message", "type", "param", "code"}}`, `param` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service.openai_schemas import OpenAIError, OpenAIErrorBody

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 504: "timeout_error"}
_CODES = {413: "body_too_large", 429: "queue_full", 503: "queue_unavailable", 504: "generation_timeout"}
_KEPT_HEADERS = ("retry-after", "location", "www-authenticate", "x-should-retry", "x-job-id")


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def to_openai(status: int, detail: Any) -> OpenAIErrorBody:
    """`detail` is a message, or a list of field errors whose `loc` ends with the field (FastAPI's 422 shape)."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        names = [_field_name(e.get("loc")) for e in detail]
        message = "; ".join(f"{name}: {e.get('msg', '')}" if name else str(e.get("msg", ""))
                            for name, e in zip(names, detail, strict=True))
        return OpenAIErrorBody(error=OpenAIError(message=message, type=error_type(status), param=names[0],
                                                 code=str(detail[0].get("type") or "") or None))
    message = detail if isinstance(detail, str) else json.dumps(detail)
    return OpenAIErrorBody(error=OpenAIError(message=message, type=error_type(status), code=_CODES.get(status)))


def _field_name(loc: Any) -> str | None:
    """The field a FastAPI error `loc` names (["body", "size"] -> "size"); None for the body as a whole."""
    parts = list(loc or [])
    if parts and parts[0] in ("body", "query", "header", "path"):
        parts = parts[1:]
    if not parts or not isinstance(parts[0], str):  # e.g. ["body", 12]: invalid JSON at offset 12
        return None
    return ".".join(str(part) for part in parts)


def _handler_for(request: Request, exc: Exception) -> Callable[..., Coroutine[Any, Any, Response]] | None:
    handlers = request.app.exception_handlers
    return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)


class OpenAIErrorRoute(APIRoute):
    """An APIRoute whose errors come back in OpenAI's shape (FastAPI's documented custom route class hook)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as exc:
                respond = _handler_for(request, exc)
                if respond is None:
                    raise
                answer = await respond(request, exc)
                try:
                    detail = json.loads(answer.body).get("detail", "")
                except (ValueError, AttributeError):
                    detail = answer.body.decode(errors="replace")
                headers = {k: v for k, v in answer.headers.items() if k.lower() in _KEPT_HEADERS}
                return JSONResponse(to_openai(answer.status_code, detail).model_dump(), answer.status_code,
                                    headers=headers)

        return handle
