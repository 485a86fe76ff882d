"""Job lifecycle events: what GET /v1/jobs/{id}/events streams and what triggers webhooks.

The queue stores each event in a per-job stream (a Redis Stream with a MAXLEN and the job's TTL, or its in-memory
equivalent) atomically with the state change it reports, so every API replica sees the same events in the same
order and the stream entry id doubles as the SSE `id:`: a client reconnecting with `Last-Event-ID` resumes right
after the last event it saw. Torch-free: the API process imports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from service.jobs import image_urls

EVENT_TYPES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_EVENTS: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# What a webhook can subscribe to; `start` and `progress` are both `running` events on the SSE stream.
HOOKS: tuple[str, ...] = ("start", "progress", "completed", "failed")
DEFAULT_HOOKS: tuple[str, ...] = ("completed",)
# Longest a blocking read waits before the caller gets control back (SSE keepalive comment, deadline checks);
# below the Redis client's socket timeout (10 s) so a blocked XREAD is never mistaken for a dead connection.
BLOCK_SLICE_MS = 5000
# While a job waits, its stream looks this often whether the jobs ahead of it moved (a `position` event if so).
POSITION_SLICE_MS = 1000


@dataclass(frozen=True)
class Emission:
    """An event to record with a state change, and the webhook hook it triggers (None: no webhook)."""

    data: dict
    hook: str | None = None

    def encoded(self) -> str:
        return json.dumps({**self.data, "at": round(time.time(), 6)})


@dataclass(frozen=True)
class JobEvent:
    """One recorded event; `id` orders the events of a job (Redis stream ids, `ms-seq`)."""

    id: str
    data: dict = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.data.get("type", "")

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


def queued(job_id: str, priority: int) -> Emission:
    """The queue adds `queue_position` (jobs served before it at submission: every waiting job of a higher
    priority, then the older ones of its own) when it stores the event."""
    return Emission({"type": "queued", "job_id": job_id, "priority": priority})


def started(job_id: str, total: int) -> Emission:
    return Emission({"type": "running", "job_id": job_id, "step": 0, "total": total}, "start")


def progress(job_id: str, step: int, total: int) -> Emission:
    return Emission({"type": "running", "job_id": job_id, "step": step, "total": total}, "progress")


def succeeded(job_id: str, n: int) -> Emission:
    return Emission({"type": "succeeded", "job_id": job_id, "images": image_urls(job_id, n)}, "completed")


def failed(job_id: str, error: str) -> Emission:
    return Emission({"type": "failed", "job_id": job_id, "error": error}, "failed")


def cancelled(job_id: str) -> Emission:
    return Emission({"type": "cancelled", "job_id": job_id})


def state_change(job_id: str, to: str) -> Emission:
    """The event of a transition whose caller gave none: its type is the new status."""
    return Emission({"type": to, "job_id": job_id})


def id_key(event_id: str) -> tuple[int, int]:
    """Stream ids compare as (ms, seq) pairs, not as text."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def valid_event_id(value: str | None) -> str | None:
    """A Last-Event-ID we can resume after, or None (absent or malformed: start from the first event)."""
    if not value:
        return None
    try:
        ms, seq = id_key(value.strip())
    except ValueError:
        return None
    return f"{ms}-{seq}" if ms >= 0 and seq >= 0 else None


def sse_message(event: JobEvent) -> bytes:
    """One Server-Sent Events message; the data is a single JSON line, so it never needs splitting."""
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data)}\n\n".encode()


def sse_position(job_id: str, queue_position: int) -> bytes:
    """The waiting job's live queue position. Not a stored event, so no `id:`: the browser keeps the last stored
    event's id for Last-Event-ID, and a resumed stream sends the position as it is by then."""
    data = {"type": "position", "job_id": job_id, "queue_position": queue_position, "at": round(time.time(), 6)}
    return f"event: position\ndata: {json.dumps(data)}\n\n".encode()


SSE_KEEPALIVE = b": keepalive\n\n"
SSE_RETRY = b"retry: 1000\n\n"
