"""Service configuration: env vars prefixed PTQ4DM_ and `ptq4dm serve|worker` flags share one model."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# quantizer.constants, not the modules that define these for the library: the API process never imports torch.
from quantizer.constants import BUILTIN_MODEL_NAME, DEFAULT_CALIBRATION_CACHE_DIR, PRECISION_PRESETS, SERVING_PRESET
from service.priority import DEFAULT_AGING_BATCHES

log = logging.getLogger(__name__)

CommaList = Annotated[list[str], NoDecode]


# Backends for quantized precisions (fp32 is served eager).
SERVED_BACKENDS: tuple[str, ...] = ("auto", "openvino", "openvino-int8-bf16", "int8-x86", "int8-bf16-x86", "fake")


def available_precisions() -> tuple[str, ...]:
    """What this installation can run: fp32 and the quantizer's presets (fake-quant runs on any device)."""
    return ("fp32", *(p for p in PRECISION_PRESETS if p != "fp32"))


def served_precisions(configured: Iterable[str]) -> list[str]:
    """The configured precisions this installation can run; the API validates requests against this list."""
    available = available_precisions()
    served = [p for p in configured if p in available]
    dropped = [p for p in configured if p not in available]
    if dropped:
        log.warning("precisions %s are not available in this installation; serving %s", dropped, served)
    return served


class ServiceSettings(BaseSettings):
    """Every knob of the API and the workers; the README documents the same names and defaults."""

    model_config = SettingsConfigDict(env_prefix="PTQ4DM_", extra="ignore")

    # Queue backend: no URL -> in-memory queue with an in-process worker (the embedded default).
    redis_url: str | None = Field(None, description="Redis URL; unset = embedded in-memory queue + worker")
    redis_prefix: str = Field("ptq4dm", description="prefix of every Redis key (several deployments per Redis)")
    embedded_worker: bool | None = Field(None, description="run a worker inside `serve`; default: when no Redis")

    # HTTP.
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = Field(None, description="Bearer token for /admin; unset = admin routes are 404")
    max_body_bytes: int = Field(1_048_576, ge=1, description="request bodies larger than this are refused with 413 "
                                "before they are parsed")

    # What is served.
    models: CommaList = Field(default_factory=lambda: [BUILTIN_MODEL_NAME],
                              description="comma list of NAME=PATH (or a bare name/path); the first is the default")
    precisions: CommaList = Field(default_factory=lambda: ["fp32", "w8a8"],
                                  description="precisions to serve; ones whose backend is missing are dropped")
    backend: str = Field("auto", description="how quantized precisions run: auto (openvino on the CPU, else "
                         "int8-x86 where the CPU has int8 kernels, else fake), openvino (OpenVINO int8 kernels with "
                         "PTQ4DM's scales, fp32 elsewhere, one graph for every batch size, compiled in seconds), "
                         "openvino-int8-bf16 (the same, bf16 elsewhere: faster, less faithful), int8-x86 (PT2E "
                         "int8, compiled per batch-size bucket), int8-bf16-x86 (int8 plus bf16 for the other ops), "
                         "fake (simulation)")
    calibration_cache_dir: str = Field(DEFAULT_CALIBRATION_CACHE_DIR, description="where quantization statistics live")
    calibration: dict[str, Any] = Field(default_factory=dict,
                                        description="JSON calibration/quant overrides for quantized precisions, "
                                        f"over the '{SERVING_PRESET}' preset unless they name another "
                                        "('preset': 'ptq4dm' is the paper's method exactly)")
    openvino_cache_dir: str | None = Field(None, description="OpenVINO's compiled-model cache (CACHE_DIR): a "
                                           "restart loads the compiled blob; unset = no cache")
    compile_all_buckets: bool = Field(False, description="compile every batch-size bucket before a precision is "
                                      "ready (per-bucket backends int8-x86*); default: batch 1, the rest on first use")
    calibration_lock_ms: int = Field(600_000, ge=1000, description="how long one worker may hold the calibration lock")
    device: str = "cpu"
    torch_threads: int | None = Field(None, ge=1, description="threads of the worker's UNet passes: torch's "
                                         "intra-op pool and the OpenVINO runtime's")

    # Request limits.
    default_sampler: str = "ddim"
    default_steps: int = Field(50, ge=1)
    max_steps: int = Field(1000, ge=1)
    max_n: int = Field(16, ge=1)
    max_queue: int = Field(256, ge=1, description="queued jobs per model+precision before 429")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 429 and 503")
    result_ttl_s: int = Field(3600, ge=1, description="job records and PNGs expire this long after the last update")
    generate_timeout_s: float = Field(30.0, gt=0, description="how long POST /v1/generate waits before 202")
    high_priority_requires_token: bool = Field(False, description="priorities above normal (high, 6..9) need "
                                               "'Authorization: Bearer <admin_token>'; otherwise 403 naming "
                                               "`priority`")

    # Worker: batching, leases, retries.
    worker_id: str | None = Field(None, description="consumer name; default HOST-PID")
    max_batch: int = Field(8, ge=1, description="jobs read per batch (XREADGROUP COUNT)")
    max_batch_images: int = Field(32, ge=1, description="images per UNet forward pass")
    # 0 by default: under load the backlog fills each batch by itself (7.6 images per pass with 0 and with 2 ms,
    # docs/BENCHMARKS.md), while a window makes every job that reaches an idle worker wait it out (2 ms of window
    # cost 2.6 ms of queue overhead p50). Set it where bursts of small jobs reach idle workers.
    max_wait_ms: int = Field(0, ge=0, le=10_000, description="extra window to fill a batch after the first job "
                             "arrives (0: start at once; a backlog still forms full batches)")
    progress_interval_ms: int = Field(100, ge=0, description="least time between progress writes (and cancel checks)")
    block_ms: int = Field(500, ge=1, description="XREADGROUP BLOCK while idle")
    lease_ms: int = Field(15000, ge=100, description="a pending job idle this long is reclaimed by another worker")
    heartbeat_ms: int = Field(3000, ge=50, description="worker heartbeat and lease renewal period")
    max_deliveries: int = Field(3, ge=1, description="a job delivered more often than this is dead-lettered")
    priority_aging_batches: int = Field(DEFAULT_AGING_BATCHES, ge=1, description="after this many consecutive "
                                        "batches that passed over waiting lower-priority jobs, a worker's next "
                                        "batch starts with the lower class waiting longest")

    # Live events and webhooks.
    events_maxlen: int = Field(500, ge=10, le=100_000, description="events kept per job (SSE stream, Redis MAXLEN); "
                               "a client resuming from an older Last-Event-ID misses the trimmed progress events")
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key signing webhooks (Standard Webhooks; "
                                             "a 'whsec_' prefix means base64); unset = requests with a webhook are "
                                             "refused (422)")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="delivery attempts per webhook event")
    webhook_backoff_s: float = Field(1.0, ge=0, le=60, description="delay before the 2nd attempt; it doubles per "
                                     "attempt (at most 300 s)")
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="per-attempt HTTP timeout")
    webhook_allowed_hosts: CommaList = Field(default_factory=list, description="comma list of hosts webhooks may "
                                             "target ('*.example.com' for subdomains); empty = any public or "
                                             "private host")
    webhook_allow_loopback: bool = Field(False, description="allow webhooks to loopback addresses (127.0.0.0/8, "
                                         "::1, localhost); off because a worker's loopback is its own services")
    health_host: str = "127.0.0.1"
    health_port: int = Field(8001, description="worker probes and /metrics (`ptq4dm worker` only)")

    @field_validator("models", "precisions", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("calibration", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """`PTQ4DM_WEBHOOK_SECRET=` (as in .env.example) means no secret, never an empty signing key."""
        return None if value == "" else value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in SERVED_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SERVED_BACKENDS)}, got {value!r}")
        return value

    @field_validator("default_sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in ("ddpm", "ddim"):
            raise ValueError(f"default_sampler must be ddpm or ddim, got {value!r}")
        return value

    @property
    def run_embedded_worker(self) -> bool:
        return self.redis_url is None if self.embedded_worker is None else self.embedded_worker

    @property
    def consumer_name(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def model_paths(self) -> dict[str, str]:
        """Public model name -> what `load_model` accepts; `name=path` entries name a local directory."""
        out: dict[str, str] = {}
        for entry in self.models:
            name, sep, path = entry.partition("=")
            if sep:
                out[name.strip()] = path.strip()
            else:
                out[Path(entry).name if entry != BUILTIN_MODEL_NAME else entry] = entry
        if not out:
            raise ValueError("models: at least one model must be served")
        return out

    @property
    def default_model(self) -> str:
        return next(iter(self.model_paths))
