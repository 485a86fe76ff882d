"""The job record every queue backend stores: one flat mapping of JSON values, so Redis can hold it in a hash."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: tuple[str, ...] = ("queued", "running")


def stream_name(model: str, precision: str) -> str:
    """One stream (and consumer group) per served model+precision: workers only read what they can run."""
    return f"{model}|{precision}"


class JobRecord(BaseModel):
    """Everything known about one job; `seed + k` is the seed of image k, whatever batch it lands in."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    model: str
    precision: str
    sampler: str
    steps: int
    eta: float = 0.0
    n: int
    seed: int
    class_labels: list[int] | None = None  # one per image (class-conditional models); None: drawn from the seeds
    prompt: str | None = None  # text-to-image models: every image's prompt (required there, refused elsewhere)
    negative_prompt: str | None = None  # None: '' (plain classifier-free guidance)
    guidance_scale: float | None = None  # None: quantizer.diffusion.prompts.DEFAULT_GUIDANCE_SCALE
    status: JobState = "queued"
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    compute_s: float | None = None  # wall time of the UNet passes that carried this job (set on success)
    progress_step: int = 0
    progress_total: int = 0
    error: str | None = None
    model_version: str | None = None
    calibration_hash: str | None = None
    attempts: int = 0
    worker: str | None = None
    msg_id: str | None = None
    fingerprint: str = ""
    webhook: str | None = None  # the receiver's URL (validated at submission: service.webhooks.url_problem)
    webhook_events: list[str] = Field(default_factory=list)  # which hooks it wants (service.events.HOOKS)
    webhook_attempts: list[dict] = Field(default_factory=list)  # the last delivery attempts, bounded
    priority: int = 5  # 0..9, 9 first (service.priority); records from before priorities read as normal

    @property
    def stream(self) -> str:
        return stream_name(self.model, self.precision)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + k for k in range(self.n)]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_fields(self) -> dict[str, str]:
        """Flat str -> JSON text, the shape stored in a Redis hash (and compared by its Lua scripts)."""
        return {k: json.dumps(v) for k, v in self.model_dump(mode="json").items()}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> JobRecord:
        return cls.model_validate({k: json.loads(v) for k, v in fields.items()})


def image_urls(job_id: str, n: int) -> list[str]:
    """The public URLs of a succeeded job's PNGs (job status, SSE `succeeded` events, webhook bodies)."""
    return [f"/v1/jobs/{job_id}/images/{k}" for k in range(n)]


def encode_fields(**fields: object) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in fields.items()}
