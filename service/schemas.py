"""Typed request and response bodies of the HTTP API (they are the OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.events import DEFAULT_HOOKS
from service.jobs import JobRecord, JobState, image_urls
from service.priority import PriorityValue
from service.webhooks import MAX_URL_LENGTH

Hook = Literal["start", "progress", "completed", "failed"]

MAX_SEED = 2**32 - 1
ClassLabel = Annotated[int, Field(ge=0)]


# Request bodies are strict: JSON `true`, `"5"` or `2.0` is not an integer (a float field still takes `0`), and
# NaN/Infinity are refused, so what a client sent is what runs (and what its idempotency fingerprint covers).
STRICT_BODY = ConfigDict(extra="forbid", protected_namespaces=(), strict=True, allow_inf_nan=False)


class JobRequest(BaseModel):
    """What to generate. Absent fields take the server's defaults (model: the first served one)."""

    model_config = STRICT_BODY

    model: str | None = Field(None, description="served model name; default: the server's first model")
    sampler: Literal["ddpm", "ddim"] | None = Field(None, description="default: the server's default_sampler")
    steps: int | None = Field(None, ge=1, description="denoising steps, 1..max_steps (and the model's T)")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity; must stay 0 for ddpm")
    n: int = Field(1, ge=1, description="images, 1..max_n; image k uses seed + k")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="chosen and returned when absent")
    precision: str = Field("fp32", description="one of the served precisions (fp32, w8a8, w4a8, ...)")
    class_labels: list[ClassLabel] | ClassLabel | None = Field(
        None, description="class-conditional models only: the class of each image (a list of n), or one class for "
        "all; default: drawn from each image's seed")
    prompt: str | None = Field(None, description="text-to-image models only, and required there: what every image "
                               "shows (at most 500 characters; the tokenizer truncates at its own limit)")
    negative_prompt: str | None = Field(None, description="text-to-image models only: what to steer away from "
                                        "(classifier-free guidance's unconditional half); default empty")
    guidance_scale: float | None = Field(None, description="text-to-image models only: classifier-free guidance "
                                         "scale in [1, 30]; default 7.5")
    priority: PriorityValue | None = Field(None, description="high, normal (default), low, or 0..9 (high=9, normal=5, "
                                           "low=1): higher priorities are served first; above normal may need the "
                                           "admin token (high_priority_requires_token)")
    webhook: str | None = Field(None, max_length=MAX_URL_LENGTH,
                                description="http(s) URL that receives signed POSTs for `webhook_events` (Standard "
                                "Webhooks headers); link-local and metadata hosts are refused")
    webhook_events: list[Hook] = Field(list(DEFAULT_HOOKS), min_length=1, max_length=4,
                                       description="which events call the webhook: start, progress, completed, "
                                       "failed")

    @field_validator("webhook_events")
    @classmethod
    def _unique_hooks(cls, hooks: list[str]) -> list[str]:
        return list(dict.fromkeys(hooks))

    @field_validator("eta")
    @classmethod
    def _eta_is_ddim_only(cls, eta: float, info: ValidationInfo) -> float:
        if eta != 0.0 and info.data.get("sampler") == "ddpm":
            raise ValueError("eta applies to the ddim sampler only; leave it at 0 for ddpm")
        return eta


class GenerateRequest(JobRequest):
    timeout_s: float | None = Field(None, gt=0, description="wait at most this long (capped by the server)")


class Progress(BaseModel):
    step: int
    total: int


class Timings(BaseModel):
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    wait_s: float | None = Field(None, description="queued -> started")
    run_s: float | None = Field(None, description="started -> finished")
    compute_s: float | None = Field(None, description="sampling passes that carried this job; the rest of the "
                                                      "service time is queue and bookkeeping overhead")


class WebhookAttempt(BaseModel):
    """One delivery attempt of a webhook event (the newest ones are kept on the job)."""

    webhook_id: str = Field(description="the webhook-id header: the same on every retry of one event")
    event: str = Field(description="start | progress | completed | failed")
    attempt: int
    at: float = Field(description="when the attempt started (Unix time)")
    status_code: int | None = Field(None, description="the receiver's HTTP status, when it answered")
    error: str | None = Field(None, description="why the attempt failed, when it did")
    ok: bool


class JobCreated(BaseModel):
    id: str
    status: JobState
    queue_position: int | None


class JobStatus(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: JobState
    model: str
    precision: str
    sampler: str
    steps: int
    eta: float
    n: int
    seed: int
    seeds: list[int]
    class_labels: list[int] | None = Field(None, description="the class of each image: as requested, and once "
                                           "succeeded as run (drawn from the seed where none was given)")
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    priority: int = Field(5, description="0..9, served high to low (high=9, normal=5, low=1)")
    progress: Progress
    queue_position: int | None = Field(description="jobs served before it: every waiting job of a higher "
                                       "priority, then the older ones of its own")
    timings: Timings
    attempts: int
    worker: str | None = Field(description="the worker that ran (or runs) it")
    model_version: str | None
    calibration_hash: str | None
    error: str | None
    images: list[str] = Field(description="URLs of the PNGs, once succeeded")
    webhook: str | None = None
    webhook_events: list[str] = Field(default_factory=list)
    webhook_attempts: list[WebhookAttempt] = Field(default_factory=list, description="the newest delivery attempts")


def job_status(job: JobRecord, position: int | None) -> JobStatus:
    """The public record of a job (GET /v1/jobs/{id}, webhook bodies); `position` only while it is queued."""
    wait = job.started_at - job.created_at if job.started_at else None
    run = job.finished_at - job.started_at if job.finished_at and job.started_at else None
    return JobStatus(
        id=job.id, status=job.status, model=job.model, precision=job.precision, sampler=job.sampler,
        steps=job.steps, eta=job.eta, n=job.n, seed=job.seed, seeds=job.seeds, class_labels=job.class_labels,
        prompt=job.prompt, negative_prompt=job.negative_prompt, guidance_scale=job.guidance_scale,
        priority=job.priority,
        progress=Progress(step=job.progress_step, total=job.progress_total or job.steps), queue_position=position,
        timings=Timings(created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                        wait_s=wait, run_s=run, compute_s=job.compute_s),
        attempts=job.attempts, worker=job.worker, model_version=job.model_version,
        calibration_hash=job.calibration_hash, error=job.error,
        images=image_urls(job.id, job.n) if job.status == "succeeded" else [],
        webhook=job.webhook, webhook_events=job.webhook_events if job.webhook else [],
        webhook_attempts=[WebhookAttempt.model_validate(a) for a in job.webhook_attempts])


class GeneratedImages(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: JobState
    seeds: list[int]
    model_version: str | None
    calibration_hash: str | None
    images_png_base64: list[str]


class ServedModel(BaseModel):
    """A served model and the request fields it takes, read from its configs by the API (no model loaded), so a
    client (the playground) can offer a class or a prompt only where the model takes one."""

    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(description="the `model` of a job request")
    default: bool = Field(description="the model a request without `model` gets")
    kind: Literal["unconditional", "class-conditional", "latent", "text-to-image"] | None = Field(
        description="class-conditional: takes `class_labels`; text-to-image: takes (and needs) `prompt`, "
        "`negative_prompt`, `guidance_scale`; null: not readable by this API process (a hub id, or a path only "
        "the workers see), so only the workers check those fields")
    num_classes: int | None = Field(None, description="class-conditional: `class_labels` are 0..num_classes-1")
    class_names: list[str] | None = Field(None, description="the name of each class, where the model's "
                                          "model_index.json has an `id2label` map")
    width: int | None = Field(None, description="of the images it makes; null where not readable here")
    height: int | None = None
    precisions: list[str] = Field(description="the precisions served (the same for every model)")


class RequantizeRequest(BaseModel):
    model_config = STRICT_BODY

    model: str | None = Field(None, description="default: the server's first model")
    precision: str | None = Field(None, description="one precision, or all served ones when absent")
    calibration: dict[str, Any] | None = Field(None, description="calibration config overrides")


class OperationCreated(BaseModel):
    id: str
    status: str


class Operation(BaseModel):
    id: str
    type: str
    model: str
    precision: str | None
    created_at: float
    workers: dict[str, Any]


class ErrorDetail(BaseModel):
    """Every error but 422: `detail` says what went wrong (a failed /v1/generate job also carries its `id`)."""

    detail: Any
    id: str | None = Field(None, description="the job, when the error is about one")


class FieldError(BaseModel):
    """One invalid input; `loc` ends with the field's name."""

    loc: list[str | int]
    msg: str
    type: str
    input: Any = Field(None, description="what was sent, or its first characters when `input_truncated`")
    input_truncated: bool = Field(False, description="`input` is only a prefix of what was sent")
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    """422: every invalid field (up to a bound), each naming its field in `loc`."""

    detail: list[FieldError]
    more_errors: int = Field(0, description="errors beyond the listed ones, not shown")
