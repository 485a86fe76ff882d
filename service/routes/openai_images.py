"""POST /v1/images/generations: OpenAI's Images API over our jobs, so OpenAI clients and SDKs work unchanged.

The request becomes an ordinary job (same validation, queue, priorities and idempotency as /v1/jobs) and the route
waits for it the way /v1/generate does. Errors come back in OpenAI's shape (service.openai_errors).
"""

from __future__ import annotations

import base64

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse

from service.deps import IsAdmin, Services, Svc, field_error
from service.errors import clip_text
from service.model_info import model_info
from service.openai_errors import OpenAIErrorRoute
from service.openai_schemas import ImageData, ImageGenerationRequest, ImagesResponse, OpenAIErrorBody
from service.routes.jobs import IdempotencyKey, submit
from service.schemas import JobRequest

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIErrorRoute)

# Our failures are not worth a client's automatic retry: the job ran (or still runs) and would only run again.
_NO_RETRY = {"x-should-retry": "false"}
_ERRORS = {status: {"model": OpenAIErrorBody, "description": text} for status, text in {
    400: "the body could not be decoded",
    403: "a priority above normal without the admin token (`param`: priority)",
    409: "the job was cancelled, or the Idempotency-Key was used for a different request",
    413: "request body over max_body_bytes (refused before parsing, in the API's own `detail` shape)",
    422: "an invalid field, named in `param` (prompt for a model without one, size other than the model's, ...)",
    429: "queue full: retry after Retry-After seconds",
    500: "the job failed",
    503: "queue unreachable: retry after Retry-After seconds",
    504: "the job did not finish within generate_timeout_s; it keeps running (poll the Location)",
}.items()}


def check_model_fields(req: ImageGenerationRequest, svc: Services) -> None:
    """prompt and size depend on the model: 422 naming the field (an unknown model is left to the job's checks)."""
    model = req.model or svc.settings.default_model
    if model not in svc.models:
        return
    info = model_info(svc.settings.model_paths[model])
    if req.prompt and not info.takes_prompt:
        raise field_error("prompt", f"model {model!r} is unconditional and takes no prompt; send an empty prompt "
                          "or none", clip_text(req.prompt, 64))
    if req.size not in (None, "auto") and info.size is not None and req.size != info.size:
        raise field_error("size", f"model {model!r} generates {info.size} images only (or send size 'auto')",
                          req.size)


def job_request(req: ImageGenerationRequest, svc: Services) -> JobRequest:
    """The job an OpenAI request means; its prompt goes along for a model that takes one (text-to-image)."""
    model = req.model or svc.settings.default_model
    takes_prompt = model in svc.models and model_info(svc.settings.model_paths[model]).takes_prompt
    fields = {"model": req.model, "sampler": req.sampler, "steps": req.steps, "n": req.n, "seed": req.seed,
              "precision": req.precision, "priority": req.priority, "prompt": req.prompt if takes_prompt else None}
    return JobRequest(**{k: v for k, v in fields.items() if v is not None})


@router.post("/images/generations", response_model=ImagesResponse, responses=_ERRORS,
             summary="Generate images (OpenAI Images API)")
async def images_generations(req: ImageGenerationRequest, request: Request, svc: Svc, admin: IsAdmin,
                             idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """OpenAI's `images.generate`: waits for the images and returns them as base64 PNGs or URLs."""
    check_model_fields(req, svc)
    job, _ = await submit(job_request(req, svc), svc, idempotency_key, admin)
    location = {"Location": f"/v1/jobs/{job.id}", "X-Job-Id": job.id}
    final = await svc.store.wait(job.id, svc.settings.generate_timeout_s) or job
    if not final.terminal:
        raise HTTPException(504, detail=f"job {job.id} still {final.status} after {svc.settings.generate_timeout_s} "
                            f"s; it keeps running: poll GET /v1/jobs/{job.id}", headers={**location, **_NO_RETRY})
    if final.status != "succeeded":
        status = 409 if final.status == "cancelled" else 500
        raise HTTPException(status, detail=f"job {job.id} {final.status}: {final.error or 'cancelled'}",
                            headers={**location, **_NO_RETRY})
    if req.response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [ImageData(url=f"{base}/v1/jobs/{job.id}/images/{k}") for k in range(final.n)]
    else:
        pngs = [await svc.store.fetch_image(job.id, k) for k in range(final.n)]
        if any(png is None for png in pngs):
            raise HTTPException(500, detail=f"images of job {job.id} expired before they were read",
                                headers={**location, **_NO_RETRY})
        data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in pngs]
    body = ImagesResponse(created=int(final.created_at), data=data)
    return JSONResponse(body.model_dump(exclude_none=True), headers=location)
