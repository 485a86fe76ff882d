"""What request handlers depend on: one Services container per app, injected with FastAPI's Depends."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from quantizer.diffusion.kinds import ModelKind
from service.errors import compact_error
from service.metrics import Metrics
from service.queue.base import QueueBackend
from service.queue.bus import ControlBus
from service.queue.store import JobStore
from service.settings import ServiceSettings

if TYPE_CHECKING:  # the worker imports the ML stack; an API-only process never loads it
    from service.worker import Worker


@dataclass
class Services:
    settings: ServiceSettings
    backend: QueueBackend  # the routes take the role they need: `store`, or `bus` (admin, health)
    metrics: Metrics
    models: list[str]
    precisions: list[str]
    worker: Worker | None = None  # the embedded worker, if this process runs one
    # Served model -> its kind (class labels it takes), read from its config; None where only workers can read it.
    model_kinds: dict[str, ModelKind | None] = field(default_factory=dict)
    accepting: bool = True
    extras: dict = field(default_factory=dict)

    @property
    def store(self) -> JobStore:
        return self.backend.store

    @property
    def bus(self) -> ControlBus:
        return self.backend.bus


def get_services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(get_services)]


def field_error(field_name: str, msg: str, value: object = None, status: int = 422) -> HTTPException:
    """The same shape as FastAPI's own validation errors, so clients find the field in `loc`; `input` is clipped."""
    return HTTPException(status, detail=[compact_error({"type": "value_error", "loc": ["body", field_name],
                                                        "msg": msg, "input": value})])


# auto_error=False: the dependency only declares the scheme (OpenAPI `security`); require_admin decides 404 vs 401.
_bearer = HTTPBearer(auto_error=False, description="PTQ4DM_ADMIN_TOKEN")


def is_admin(svc: Svc, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> bool:
    """Whether the request carries the admin token, on routes open to everyone that grant the admin more (priority).

    A plain header, not the Bearer security scheme: these routes need no credentials, and the schema says so.
    """
    token = svc.settings.admin_token
    scheme, _, given = (authorization or "").partition(" ")
    return bool(token) and scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(),
                                                                                 token.encode())


IsAdmin = Annotated[bool, Depends(is_admin)]


def require_admin(svc: Svc,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> None:
    """No token configured: admin routes do not exist (404). Wrong or missing token: 401."""
    token = svc.settings.admin_token
    if not token:
        raise HTTPException(404, detail="Not Found")
    given = credentials.credentials if credentials is not None else ""
    if credentials is None or not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, detail="admin routes need 'Authorization: Bearer <admin_token>'",
                            headers={"WWW-Authenticate": "Bearer"})
