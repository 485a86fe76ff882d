"""Refuse oversized request bodies with 413 before any handler parses them (a pure ASGI middleware).

A declared Content-Length over the limit is refused without reading a byte. A body without one (chunked, or a
Content-Length that lies) is read up to the limit and then refused, so memory stays bounded by the limit; an
accepted body is replayed to the app unchanged.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay(bytes(body), message, receive), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._refuse(send)
                return
        await self.app(scope, _replay(bytes(body), None, receive), send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps({"detail": f"request body over the limit of {self.max_body_bytes} bytes "
                                        "(max_body_bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # malformed: the server rejects it, or the counted body decides
    return None


def _replay(body: bytes, pending: Message | None, receive: Receive) -> Receive:
    """The whole body as one message, then whatever the client sends next (a disconnect)."""
    queue: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if pending is not None:
        queue = [pending]

    async def replayed() -> Message:
        return queue.pop(0) if queue else await receive()

    return replayed
