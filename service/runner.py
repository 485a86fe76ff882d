"""Process entry points: `ptq4dm serve` (API, embedded worker by default) and `ptq4dm worker` (Redis consumer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from service.api import build_services, create_app
from service.routes import health
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


def serve(settings: ServiceSettings) -> int:
    """uvicorn turns SIGTERM/SIGINT into a graceful shutdown; the lifespan then stops the embedded worker."""
    mode = "embedded in-memory queue + worker" if settings.redis_url is None else f"redis {settings.redis_url}"
    log.info("ptq4dm serve on http://%s:%d (%s)", settings.host, settings.port, mode)
    # Open event streams (SSE) would hold a graceful shutdown for as long as their jobs run: after the longest
    # /v1/generate wait they are closed, and their clients resume on another replica with Last-Event-ID.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=int(settings.generate_timeout_s) + 5)
    return 0


class _QuietServer(uvicorn.Server):
    """The probe server must not take over SIGTERM: the worker's own handler drains the batch first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def worker_probe_app(settings: ServiceSettings) -> FastAPI:
    services = build_services(settings.model_copy(update={"embedded_worker": True}))
    app = FastAPI(title="ptq4dm worker probes")
    app.state.services = services
    app.include_router(health.router)
    return app


async def run_worker(settings: ServiceSettings) -> int:
    """Start (load, quantize, warm up), then consume until SIGTERM; the batch in hand is finished, exit 0."""
    if settings.redis_url is None:
        raise ValueError("redis_url: `ptq4dm worker` needs PTQ4DM_REDIS_URL (embedded mode runs inside serve)")
    app = worker_probe_app(settings)
    services = app.state.services
    worker = services.worker
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    probes = _QuietServer(uvicorn.Config(app, host=settings.health_host, port=settings.health_port,
                                         log_level="warning", lifespan="off"))
    probe_task = asyncio.create_task(probes.serve())
    try:
        try:
            await worker.start()
        except Exception:
            log.exception("worker %s failed to start", worker.id)
            return 1
        log.info("worker %s ready on %s", worker.id, worker.streams)
        try:
            await worker.run()
        except Exception:
            log.exception("worker %s crashed", worker.id)
            return 1
        log.info("worker %s stopped", worker.id)
        return 0
    finally:
        probes.should_exit = True
        await probe_task
        await services.backend.close()


def worker(settings: ServiceSettings) -> int:
    return asyncio.run(run_worker(settings))
