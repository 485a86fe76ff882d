"""The documented error responses of each route: every status the API can answer appears in its OpenAPI schema."""

from __future__ import annotations

from typing import Any

from service.schemas import ErrorDetail, ValidationErrorBody

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}

ERRORS: dict[int, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "the body could not be decoded (not UTF-8 text)"},
    401: {"model": ErrorDetail, "description": "missing or wrong Bearer token (WWW-Authenticate: Bearer)",
          "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}},
    403: {"model": ValidationErrorBody, "description": "a field asks for more than this caller may use (e.g. a "
          "priority above normal without the admin token); `loc` names it"},
    404: {"model": ErrorDetail, "description": "not found"},
    409: {"model": ErrorDetail, "description": "conflict"},
    413: {"model": ErrorDetail, "description": "request body over max_body_bytes (refused before parsing)"},
    422: {"model": ValidationErrorBody, "description": "invalid fields, each named in `loc`; inputs echoed short"},
    429: {"model": ErrorDetail, "description": "queue full: retry after Retry-After seconds", "headers": _RETRY_AFTER},
    500: {"model": ErrorDetail, "description": "the job failed (its error and id are in the body)"},
    503: {"model": ErrorDetail, "description": "queue unreachable: retry after Retry-After seconds",
          "headers": _RETRY_AFTER},
}


def errors(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """The given statuses with their error model; `descriptions` (keyed `e404=...`) say what each means here."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry = dict(ERRORS[status])
        if f"e{status}" in descriptions:
            entry["description"] = descriptions[f"e{status}"]
        out[status] = entry
    return out


# What any route that takes a JSON body can answer before its handler runs.
BODY_ERRORS = (400, 413, 422)
