"""The in-memory backend for the embedded default: Redis Streams semantics in one event loop, no persistence."""

from __future__ import annotations

from service.priority import DEFAULT_AGING_BATCHES
from service.queue.base import QueueBackend
from service.queue.memory.bus import MemoryControlBus
from service.queue.memory.state import MemoryState
from service.queue.memory.store import MemoryJobStore
from service.queue.memory.stream import MemoryWorkStream


class MemoryBackend(QueueBackend):
    def __init__(self, events_maxlen: int = 500, aging_batches: int = DEFAULT_AGING_BATCHES) -> None:
        state = MemoryState(events_maxlen)
        self.store = MemoryJobStore(state)
        self.stream = MemoryWorkStream(state, aging_batches)
        self.bus = MemoryControlBus(state)

    async def ping(self) -> bool:
        return True


__all__ = ["MemoryBackend", "MemoryControlBus", "MemoryJobStore", "MemoryWorkStream"]
