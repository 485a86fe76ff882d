"""Blocking model work (loading, calibrating, sampling) off the event loop, so leases and heartbeats keep going."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: object) -> T:
    """asyncio.to_thread, except that a StopIteration escaping `fn` fails the caller: asyncio cannot set it on a
    future, so a bare to_thread would leave the awaiting task pending forever."""
    def call() -> T:
        try:
            return fn(*args)
        except StopIteration as exc:
            raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} raised StopIteration") from exc

    return await asyncio.to_thread(call)
