"""/v1: submit, poll or follow (Server-Sent Events), fetch images, cancel, and the synchronous /v1/generate."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from quantizer.diffusion.kinds import check_class_labels
from quantizer.diffusion.prompts import check_text_inputs
from service import events
from service.deps import IsAdmin, Services, Svc, field_error
from service.errors import clip_text
from service.jobs import JobRecord
from service.priority import NORMAL, level
from service.queue import QueueUnavailable
from service.responses import BODY_ERRORS, errors
from service.schemas import GeneratedImages, GenerateRequest, JobCreated, JobRequest, JobStatus, job_status
from service.webhooks import url_problem

router = APIRouter(prefix="/v1", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200,
                                              description="the same key returns the same job (for the result TTL)")]
_UNKNOWN_JOB = "unknown job, or expired after the result TTL"
_JOB_ERRORS = errors(404, 422, 503, e404=_UNKNOWN_JOB)
_IDEMPOTENCY_REUSED = "the Idempotency-Key was already used for a different request"
_LOCATION = {"Location": {"description": "the job's status URL", "schema": {"type": "string"}}}


def build_job(req: JobRequest, svc: Services, admin: bool = False) -> JobRecord:
    """Fill defaults and check what depends on configuration; 422 names the field and lists what is served."""
    s = svc.settings
    priority = level(req.priority)
    if priority > NORMAL and s.high_priority_requires_token and not admin:
        raise field_error("priority", "priorities above normal need 'Authorization: Bearer <admin_token>' here "
                          "(high_priority_requires_token)", req.priority, status=403)
    model = req.model or s.default_model
    if model not in svc.models:
        raise field_error("model", f"unknown model {clip_text(repr(model), 80)}; served: {svc.models}", model)
    if req.precision not in svc.precisions:
        raise field_error("precision", f"precision {clip_text(repr(req.precision), 80)} is not served; "
                          f"served: {svc.precisions}", req.precision)
    sampler = req.sampler or s.default_sampler
    steps = req.steps if req.steps is not None else s.default_steps
    if steps > s.max_steps:
        raise field_error("steps", f"steps must be in 1..{s.max_steps}", steps)
    if req.n > s.max_n:
        raise field_error("n", f"n must be in 1..{s.max_n}", req.n)
    if sampler == "ddpm" and req.eta != 0.0:
        raise field_error("eta", "eta applies to the ddim sampler only; leave it at 0 for ddpm", req.eta)
    class_labels = _class_labels(req, model, svc)
    _check_text(req, model, svc)
    if req.webhook is not None:
        if s.webhook_secret is None:
            raise field_error("webhook", "webhooks are off on this server: no webhook_secret is configured "
                              "(PTQ4DM_WEBHOOK_SECRET)", req.webhook)
        problem = url_problem(req.webhook, s.webhook_allowed_hosts, s.webhook_allow_loopback)
        if problem is not None:
            raise field_error("webhook", f"webhook URL refused: {problem}", req.webhook)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    # The fingerprint is the request as sent (seed absent stays absent): a retried request matches it. Absent
    # class labels and priority are left out, so requests without them keep the fingerprint they had before the
    # fields existed.
    absent = {name for name in ("class_labels", "priority", "prompt", "negative_prompt", "guidance_scale")
              if getattr(req, name) is None}
    sent = req.model_dump(exclude={"timeout_s"} | absent)
    fingerprint = hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()
    return JobRecord(model=model, precision=req.precision, sampler=sampler, steps=steps, eta=req.eta, n=req.n,
                     seed=seed, class_labels=class_labels, fingerprint=fingerprint, priority=priority,
                     prompt=req.prompt, negative_prompt=req.negative_prompt, guidance_scale=req.guidance_scale,
                     webhook=req.webhook, webhook_events=list(req.webhook_events) if req.webhook else [])


def _class_labels(req: JobRequest, model: str, svc: Services) -> list[int] | None:
    """One label per image (a single int is every image's), checked against the model's classes where this
    process knows them (`svc.model_kinds`); 422 naming class_labels otherwise."""
    if req.class_labels is None:
        return None
    labels = [req.class_labels] * req.n if isinstance(req.class_labels, int) else list(req.class_labels)
    try:
        check_class_labels(labels, req.n, svc.model_kinds.get(model))
    except ValueError as exc:
        raise field_error("class_labels", str(exc).removeprefix("class_labels: "), req.class_labels) from None
    return labels


def _check_text(req: JobRequest, model: str, svc: Services) -> None:
    """prompt, negative_prompt and guidance_scale against the model's kind where this process knows it
    (`quantizer.diffusion.prompts.check_text_inputs`, the check the worker repeats); 422 naming the field."""
    try:
        check_text_inputs(req.prompt, req.negative_prompt, req.guidance_scale, svc.model_kinds.get(model))
    except ValueError as exc:
        message = str(exc)
        field = message.split(":")[0].split(" ")[0]
        raise field_error(field, message.removeprefix(f"{field}: "), getattr(req, field)) from None


async def to_status(job: JobRecord, svc: Services) -> JobStatus:
    position = await svc.store.position(job) if job.status == "queued" else None
    return job_status(job, position)


async def submit(req: JobRequest, svc: Services, idempotency_key: str | None,
                 admin: bool = False) -> tuple[JobRecord, bool]:
    job = build_job(req, svc, admin)
    job, created = await svc.store.submit(job, idempotency_key, svc.settings.max_queue, svc.settings.result_ttl_s)
    if created:
        svc.metrics.jobs_submitted.inc()
    return job, created


def _label_header(job: JobRecord, k: int) -> dict[str, str]:
    """X-Class-Label of image k, where the job record knows it (class-conditional models)."""
    return {"X-Class-Label": str(job.class_labels[k])} if job.class_labels else {}


async def created_body(job: JobRecord, svc: Services) -> JobCreated:
    return JobCreated(id=job.id, status=job.status, queue_position=await svc.store.position(job))


async def get_job(job_id: str, svc: Services) -> JobRecord:
    job = await svc.store.get(job_id)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found (unknown, or expired after the result TTL)")
    return job


@router.post("/jobs", status_code=202, response_model=JobCreated,
             responses={202: {"headers": _LOCATION},
                        **errors(*BODY_ERRORS, 403, 409, 429, 503, e409=_IDEMPOTENCY_REUSED)})
async def create_job(req: JobRequest, response: Response, svc: Svc, admin: IsAdmin,
                     idempotency_key: IdempotencyKey = None) -> JobCreated:
    """Queue a generation; poll the Location for its status."""
    job, _ = await submit(req, svc, idempotency_key, admin)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return await created_body(job, svc)


@router.get("/jobs/{job_id}", response_model=JobStatus, responses=_JOB_ERRORS)
async def read_job(job_id: str, svc: Svc) -> JobStatus:
    return await to_status(await get_job(job_id, svc), svc)


_SSE_DOC = ("`text/event-stream`: events `queued` (`priority`; `queue_position`: jobs served before it at submission, "
            "every waiting job of a higher priority then the older ones of its own), `position` while it waits "
            "(`queue_position` each time it changed; no `id:`), `running` "
            "(`step`/`total`), then one of `succeeded` (`images`: URLs), `failed` (`error`), `cancelled`, after which "
            "the stream ends. Each event's `id:` is resumable: reconnect with `Last-Event-ID` to get only the events "
            "after it. Comments (`: keepalive`) every few seconds while nothing happens.")


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": _SSE_DOC},
                       204: {"description": "the job already finished and Last-Event-ID is its last event"},
                       **_JOB_ERRORS})
async def job_events(job_id: str, svc: Svc, last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID", max_length=64, description="resume after this event id")] = None) -> Response:
    """Follow a job live (Server-Sent Events) until it succeeds, fails or is cancelled."""
    job = await get_job(job_id, svc)
    after = events.valid_event_id(last_event_id)
    first = await svc.store.read_events(job_id, after, 0)
    if not first and job.terminal:
        return Response(status_code=204)  # nothing left to tell: EventSource clients stop reconnecting on 204
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Job-Id": job_id}
    return StreamingResponse(_event_stream(svc, job, first, after), media_type="text/event-stream",
                             headers=headers)


async def _event_stream(svc: Services, job: JobRecord, first: list[events.JobEvent],
                        after: str | None) -> AsyncIterator[bytes]:
    """Relay the job's event stream (blocking reads, no polling) until its terminal event; keepalive comments
    between events let proxies and clients tell a quiet job from a dead connection. While the job waits, a
    `position` event each time the jobs ahead of it moved (finished, cancelled, or a higher priority arrived)."""
    yield events.SSE_RETRY
    batch, waiting, position = first, job.status == "queued", None
    while True:
        for event in batch:
            yield events.sse_message(event)
            after = event.id
            if event.terminal:
                return
            waiting = event.type == "queued"
            position = event.data.get("queue_position", position)
        try:
            batch = await svc.store.read_events(job.id, after,
                                                events.POSITION_SLICE_MS if waiting else events.BLOCK_SLICE_MS)
            if batch:
                continue
            current = await svc.store.get(job.id)
            if current is None:
                return  # expired
            now = await svc.store.position(current) if waiting and current.status == "queued" else None
        except QueueUnavailable:
            return  # the client reconnects with its Last-Event-ID once Redis is back
        if now is not None and now != position:
            position = now
            yield events.sse_position(job.id, now)
        else:
            yield events.SSE_KEEPALIVE


@router.get("/jobs/{job_id}/images/{k}", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **_JOB_ERRORS,
                       **errors(404, 409, e404=f"{_UNKNOWN_JOB}; or no such image", e409="the job has not succeeded")})
async def read_image(job_id: str, k: Annotated[int, Path(ge=0)], svc: Svc) -> Response:
    job = await get_job(job_id, svc)
    if job.status != "succeeded":
        raise HTTPException(409, detail=f"job {job_id} is {job.status}; images exist once it succeeded")
    if k >= job.n:
        raise HTTPException(404, detail=f"image {k} out of range: the job has images 0..{job.n - 1}")
    png = await svc.store.fetch_image(job_id, k)
    if png is None:
        raise HTTPException(404, detail=f"image {k} of job {job_id} expired")
    return Response(png, media_type="image/png",
                    headers={"X-Seed": str(job.seed + k), "X-Job-Id": job_id, **_label_header(job, k)})


@router.delete("/jobs/{job_id}", response_model=JobStatus,
               responses={**_JOB_ERRORS, **errors(409, e409="the job already finished")})
async def cancel_job(job_id: str, svc: Svc) -> JobStatus:
    """Queued: removed from the queue. Running: stops at the worker's next denoising step."""
    job = await svc.store.cancel(job_id, svc.settings.result_ttl_s)
    if job is None:
        raise HTTPException(404, detail=f"job {job_id} not found (unknown, or expired after the result TTL)")
    if job.status != "cancelled":
        raise HTTPException(409, detail=f"job {job_id} already {job.status}")
    return await to_status(job, svc)


@router.post("/generate", response_model=GeneratedImages, status_code=200,
             responses={200: {"content": {"image/png": {}}},
                        202: {"model": JobCreated, "headers": _LOCATION,
                              "description": "still running at the timeout: poll the Location"},
                        **errors(*BODY_ERRORS, 403, 404, 409, 429, 500, 503,
                                 e404="the images expired before they were read",
                                 e409=f"the job was cancelled, or {_IDEMPOTENCY_REUSED}")})
async def generate(req: GenerateRequest, request: Request, svc: Svc, admin: IsAdmin,
                   idempotency_key: IdempotencyKey = None) -> Response:
    """Submit and wait. n=1 with `Accept: image/png` returns the PNG; otherwise JSON with base64 PNGs.

    On timeout the work is not lost: 202 with the job id, to poll like any job.
    """
    job, _ = await submit(req, svc, idempotency_key, admin)
    timeout = min(req.timeout_s or svc.settings.generate_timeout_s, svc.settings.generate_timeout_s)
    final = await svc.store.wait(job.id, timeout) or job
    location = {"Location": f"/v1/jobs/{job.id}"}
    if not final.terminal:
        body = await created_body(final, svc)
        return JSONResponse(body.model_dump(), status_code=202, headers=location)
    if final.status == "failed":
        return JSONResponse({"detail": f"job failed: {final.error}", "id": final.id}, status_code=500,
                            headers=location)
    if final.status == "cancelled":
        return JSONResponse({"detail": "job was cancelled", "id": final.id}, status_code=409, headers=location)
    pngs = [await svc.store.fetch_image(final.id, k) for k in range(final.n)]
    if any(p is None for p in pngs):
        raise HTTPException(404, detail=f"images of job {final.id} expired")
    if final.n == 1 and "image/png" in request.headers.get("accept", ""):
        return Response(pngs[0], media_type="image/png",
                        headers={**location, "X-Job-Id": final.id, "X-Seed": str(final.seed),
                                 **_label_header(final, 0)})
    body = GeneratedImages(id=final.id, status=final.status, seeds=final.seeds, model_version=final.model_version,
                           calibration_hash=final.calibration_hash,
                           images_png_base64=[base64.b64encode(p).decode() for p in pngs])
    return JSONResponse(body.model_dump(), headers=location)
