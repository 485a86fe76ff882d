"""Bodies of the OpenAI-Images-compatible route: OpenAI's request and response shapes plus our extensions.

Kept apart from service.schemas: these follow OpenAI's field names and error shape, not this API's own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.priority import PriorityValue
from service.schemas import MAX_SEED, STRICT_BODY


class ImageGenerationRequest(BaseModel):
    """OpenAI's `images.generate` body; `sampler`, `steps`, `precision`, `seed`, `priority` are ptq4dm extensions."""

    model_config = STRICT_BODY

    prompt: str | None = Field(None, description="must be empty or absent for a model that takes no prompt (every "
                               "model served today is unconditional)")
    model: str | None = Field(None, description="served model name; default: the server's first model")
    n: int | None = Field(None, ge=1, description="images, 1..max_n (default 1)")
    size: str | None = Field(None, description="WIDTHxHEIGHT, the model's own size (e.g. 32x32), or auto")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="default b64_json; url links to "
                                                               "GET /v1/jobs/{id}/images/{k} (kept for the result "
                                                               "TTL)")
    output_format: Literal["png"] | None = Field(None, description="PNG is the only format served")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    sampler: Literal["ddpm", "ddim"] | None = Field(None, description="extension; default: the server's sampler")
    steps: int | None = Field(None, ge=1, description="extension: denoising steps, 1..max_steps")
    precision: str | None = Field(None, description="extension: one of the served precisions (default fp32)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="extension: image k uses seed + k")
    priority: PriorityValue | None = Field(None, description="extension: high, normal, low or 0..9, as on /v1/jobs")


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the PNG, base64 (response_format b64_json)")
    url: str | None = Field(None, description="where to GET the PNG (response_format url)")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time the job was created")
    data: list[ImageData]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                      "rate_limit_error, server_error or timeout_error")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """Every error of the OpenAI-compatible route (but a 413, refused before any route runs)."""

    error: OpenAIError
