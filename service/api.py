"""The FastAPI app: a queue (Redis, or in-memory with an in-process worker) behind typed routes.

Data path: POST /v1/jobs -> JobStore.submit -> WorkStream -> Worker (batch, Engine.generate, PNG) ->
JobStore.store_images -> GET image. Only the embedded worker imports torch and diffusers, when it is built: an API-only
process (Redis, no embedded worker) validates requests from the settings alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.body_limit import BodyLimitMiddleware
from service.deps import Services
from service.docs import mount_offline_docs
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.model_kinds import served_model_kinds
from service.openapi import document_live_limits
from service.playground import mount_playground
from service.queue import IdempotencyConflict, QueueBackend, QueueFull, QueueUnavailable, make_backend
from service.routes import admin, health, jobs, models, openai_images
from service.settings import ServiceSettings, served_precisions

if TYPE_CHECKING:
    from service.worker import Worker

log = logging.getLogger(__name__)


def build_services(settings: ServiceSettings, backend: QueueBackend | None = None) -> Services:
    backend = backend or make_backend(settings.redis_url, settings.redis_prefix, settings.events_maxlen,
                                settings.priority_aging_batches)
    metrics = Metrics()
    precisions = served_precisions(settings.precisions)
    if not precisions:
        raise ValueError(f"precisions: none of {settings.precisions} can be served here")
    worker = None
    if settings.run_embedded_worker:
        from service.provider import ModelProvider  # the ML stack: only in a process that runs a worker
        from service.worker import Worker

        provider = ModelProvider(settings.model_paths, precisions, settings.calibration_cache_dir, settings.device,
                                 settings.calibration, settings.backend, settings.max_batch_images,
                                 settings.compile_all_buckets, settings.openvino_cache_dir)
        worker = Worker(settings, backend, provider, metrics)
    return Services(settings=settings, backend=backend, metrics=metrics, models=list(settings.model_paths),
                    precisions=precisions, worker=worker, model_kinds=served_model_kinds(settings.model_paths))


async def _run_worker(worker: Worker) -> None:
    try:
        await worker.start()
    except Exception:
        log.exception("embedded worker failed to start; /readyz stays 503")
        return
    try:
        await worker.run()
    except Exception:
        log.exception("embedded worker crashed; /readyz stays 503")


def create_app(settings: ServiceSettings | None = None, backend: QueueBackend | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    services = build_services(settings, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_run_worker(services.worker)) if services.worker is not None else None
        try:
            yield
        finally:
            services.accepting = False
            if task is not None:
                services.worker.request_stop()
                await task
            await services.backend.close()

    app = FastAPI(title="ptq4dm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Post-training-quantized diffusion models as a service. Async jobs under /v1.")
    app.state.services = services
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(openai_images.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    mount_offline_docs(app)
    mount_playground(app)
    install_error_handlers(app)
    _install_error_handlers(app, services)
    document_live_limits(app, settings, services.models, services.precisions)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    return app


def _install_error_handlers(app: FastAPI, svc: Services) -> None:
    retry_after = {"Retry-After": str(svc.settings.retry_after_s)}

    @app.exception_handler(QueueUnavailable)
    async def _unavailable(_: Request, exc: QueueUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"queue unavailable: {exc}"}, status_code=503, headers=retry_after)

    @app.exception_handler(QueueFull)
    async def _full(_: Request, exc: QueueFull) -> JSONResponse:
        svc.metrics.jobs_rejected.labels("queue_full").inc()
        return JSONResponse({"detail": str(exc)}, status_code=429, headers=retry_after)

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(_: Request, exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)
