"""The in-memory ControlBus: one process's registry, control log, operations and locks."""

from __future__ import annotations

import time

from service.queue.bus import ControlBus
from service.queue.memory.state import MemoryState, live


class MemoryControlBus(ControlBus):
    def __init__(self, state: MemoryState) -> None:
        self.s = state  # ids and wake-ups are shared with the other roles
        self._workers: dict[str, tuple[dict, float]] = {}
        self._control: list[tuple[str, dict]] = []
        self._ops: dict[str, tuple[dict, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}

    async def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        self._workers[worker_id] = (dict(info), time.time() + ttl_s)

    async def workers(self) -> list[dict]:
        return [info for info, expires in self._workers.values() if expires > time.time()]

    async def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def publish_control(self, message: dict) -> str:
        msg_id = self.s.next_id()
        self._control.append((msg_id, dict(message)))
        self.s.notify()
        return msg_id

    async def read_control(self, last_id: str | None, block_ms: int) -> tuple[str, list[dict]]:
        if last_id is None:
            return (self._control[-1][0] if self._control else "0-0"), []
        deadline = time.monotonic() + block_ms / 1000
        while True:
            after = int(last_id.split("-")[0])
            new = [(i, m) for i, m in self._control if int(i.split("-")[0]) > after]
            if new or time.monotonic() >= deadline:
                return (new[-1][0] if new else last_id), [m for _, m in new]
            await self.s.wait(deadline)

    async def set_operation(self, op_id: str, fields: dict, ttl_s: int) -> None:
        current = self._ops[op_id][0] if live(self._ops.get(op_id)) else {}
        self._ops[op_id] = ({**current, **fields}, time.time() + ttl_s)

    async def get_operation(self, op_id: str) -> dict | None:
        entry = self._ops.get(op_id)
        return dict(entry[0]) if live(entry) else None

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        holder = self._locks.get(name)
        if live(holder) and holder[0] != owner:
            return False
        self._locks[name] = (owner, time.time() + ttl_ms / 1000)
        return True

    async def release_lock(self, name: str, owner: str) -> None:
        if self._locks.get(name, ("",))[0] == owner:
            del self._locks[name]
