"""Probes and metrics. /livez never touches the queue or models; /readyz says whether work can be accepted."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import Svc
from service.jobs import stream_name
from service.queue.base import QueueUnavailable

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(svc: Svc) -> JSONResponse:
    """API: queue reachable and accepting. With an embedded worker also: models built and warmed up."""
    checks = {"queue": await svc.queue.ping(), "accepting": svc.accepting}
    if svc.worker is not None:
        checks["worker"] = svc.worker.ready
    body = {"status": "ready" if all(checks.values()) else "not ready", "checks": checks}
    if svc.worker is not None and svc.worker.error:
        body["error"] = svc.worker.error
    return JSONResponse(body, status_code=200 if all(checks.values()) else 503)


@router.get("/startupz")
async def startupz(svc: Svc) -> JSONResponse:
    """Passes once start-up work (loading, quantizing, warm-up) is over, so liveness checks can begin."""
    started = svc.worker is None or svc.worker.started
    state = svc.worker.state if svc.worker is not None else "api"
    return JSONResponse({"started": started, "state": state}, status_code=200 if started else 503)


@router.get("/metrics", response_class=Response)
async def metrics(svc: Svc) -> Response:
    m = svc.metrics
    try:
        for model in svc.models:
            for precision in svc.precisions:
                stream = stream_name(model, precision)
                m.queue_depth.labels(stream).set(await svc.queue.depth(stream))
        m.workers_ready.set(sum(1 for w in await svc.queue.workers() if w.get("ready")))
    except QueueUnavailable:
        pass  # the gauges keep their last values; the counters are still worth scraping
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
