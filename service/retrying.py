"""Riding out a short queue outage (a Redis restart) instead of dropping finished work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.queue.base import QueueUnavailable

T = TypeVar("T")


class Retrying:
    """Retries a queue call while the backend is unavailable; `queue_ok` says whether the last one answered."""

    def __init__(self, lease_ms: int, stop: asyncio.Event) -> None:
        self.lease_ms = lease_ms
        self.stop = stop
        self.queue_ok = True

    async def __call__(self, call: Callable[[], Awaitable[T]], forever: bool = False) -> T:
        """Gives up after one lease: by then the entry may be reclaimed elsewhere, and the job is re-run there.

        forever: until the backend answers or the worker stops (starting up, waiting for a lock).
        """
        deadline = time.monotonic() + self.lease_ms / 1000
        while True:
            try:
                return await call()
            except QueueUnavailable:
                if (forever and self.stop.is_set()) or (not forever and time.monotonic() >= deadline):
                    raise
                self.queue_ok = False
                await asyncio.sleep(0.2)
