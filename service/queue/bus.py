"""ControlBus: what workers and admins say to each other, apart from jobs.

The worker registry (heartbeats that expire), a broadcast control channel (re-quantize requests), operation
records (each worker's answer to one), and named locks (one worker calibrates, the others wait).
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ControlBus(ABC):
    """Both backends pass the same contract tests (tests/test_control_bus.py)."""

    @abstractmethod
    async def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        """Publish this worker's state; it disappears `ttl_s` after the last beat."""

    @abstractmethod
    async def workers(self) -> list[dict]: ...

    @abstractmethod
    async def remove_worker(self, worker_id: str) -> None: ...

    @abstractmethod
    async def publish_control(self, message: dict) -> str:
        """Broadcast to every worker (each sees every message published after it started listening)."""

    @abstractmethod
    async def read_control(self, last_id: str | None, block_ms: int) -> tuple[str, list[dict]]:
        """Messages after `last_id` (None = only future ones); returns the new last id and the messages."""

    @abstractmethod
    async def set_operation(self, op_id: str, fields: dict, ttl_s: int) -> None:
        """Merge `fields` into the operation's record (each worker adds its own key)."""

    @abstractmethod
    async def get_operation(self, op_id: str) -> dict | None: ...

    @abstractmethod
    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take a named lock (e.g. "only one worker calibrates"); it expires by itself if the owner dies."""

    @abstractmethod
    async def release_lock(self, name: str, owner: str) -> None:
        """Release it if `owner` still holds it."""
