"""Error bodies that stay small and JSON-safe whatever the client sent, and a 405 whose Allow is the whole truth.

A 422 echoes at most a short prefix of each offending input (`input_truncated` says so) and a bounded number of
errors, so a megabyte of bad input cannot come back as a megabyte (or two) of error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

INPUT_PREFIX_CHARS = 64  # how much of an invalid input a 422 echoes
TEXT_MAX_CHARS = 300  # messages and context values
MAX_ERRORS = 10  # errors listed per 422; the rest are counted in `more_errors`
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _safe_text(text: str) -> str:
    """Lone surrogates (valid in JSON strings, not in UTF-8) would make the response itself fail to encode."""
    return text.encode("utf-8", "replace").decode("utf-8")


def clip_text(text: str, limit: int = TEXT_MAX_CHARS) -> str:
    text = _safe_text(text)
    return text if len(text) <= limit else text[:limit] + "..."


def clip_input(value: Any, limit: int = INPUT_PREFIX_CHARS) -> tuple[Any, bool]:
    """(what to echo, whether it was truncated): the value itself when small, else a prefix of its text."""
    if isinstance(value, str):
        return (_safe_text(value), False) if len(value) <= limit else (_safe_text(value[:limit]), True)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value), False  # NaN and Infinity are not JSON
    try:
        encoded = jsonable_encoder(value)
        text = json.dumps(encoded, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        encoded, text = None, repr(value)
    if encoded is not None and len(text) <= limit:
        return json.loads(_safe_text(text)), False
    return _safe_text(text[:limit]), len(text) > limit


def compact_error(error: Mapping[str, Any]) -> dict[str, Any]:
    """One pydantic/FastAPI error dict, bounded: short loc parts, message, context values and input prefix."""
    out: dict[str, Any] = {
        "type": clip_text(str(error.get("type", "value_error")), INPUT_PREFIX_CHARS),
        "loc": [part if isinstance(part, int) and not isinstance(part, bool) else clip_text(str(part),
                                                                                            INPUT_PREFIX_CHARS)
                for part in error.get("loc", ())],
        "msg": clip_text(str(error.get("msg", ""))),
    }
    if "input" in error:
        out["input"], truncated = clip_input(error["input"])
        if truncated:
            out["input_truncated"] = True
    ctx = error.get("ctx")
    if isinstance(ctx, Mapping):
        out["ctx"] = {clip_text(str(k), INPUT_PREFIX_CHARS): clip_input(v, TEXT_MAX_CHARS)[0] for k, v in ctx.items()}
    return out


def compact_errors(errors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 body: the first MAX_ERRORS errors, compacted, and how many more there were."""
    errors = list(errors)
    body: dict[str, Any] = {"detail": [compact_error(e) for e in errors[:MAX_ERRORS]]}
    if len(errors) > MAX_ERRORS:
        body["more_errors"] = len(errors) - MAX_ERRORS
    return body


def allowed_methods(app: FastAPI, scope: Mapping[str, Any]) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route it tried)."""
    allowed = []
    for method in _METHODS:
        probe = {**scope, "method": method}
        if any(route.matches(dict(probe))[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(compact_errors(exc.errors()), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            methods = allowed_methods(request.app, request.scope)
            if methods:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(methods)}
        return await http_exception_handler(request, exc)
