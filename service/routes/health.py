"""Probes and metrics. /livez never touches the queue or models; /readyz says whether work can be accepted."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import Services, Svc
from service.jobs import stream_name
from service.queue.base import QueueUnavailable

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict:
    return {"status": "alive"}


# A variant's best state over the workers that report it: one ready worker serves it.
_STATE_ORDER = ("ready", "compiling", "calibrating", "loading", "failed")
_VARIANT_FIELDS = ("state", "stage", "progress", "eta_s", "error")


async def variant_states(svc: Services) -> dict[str, dict]:
    """'model/precision' -> state (loading|calibrating|compiling|ready|failed) with the stage's progress and ETA:
    the embedded worker's own, or else the best one the workers' heartbeats report (unknown without workers)."""
    if svc.worker is not None:
        rows = svc.worker.provider.describe()
    else:
        try:
            rows = [m for w in await svc.bus.workers() for m in w.get("models", [])]
        except QueueUnavailable:
            rows = []
    states: dict[str, dict] = {f"{m}/{p}": {"state": "unknown"} for m in svc.models for p in svc.precisions}
    for row in sorted(rows, key=lambda r: _STATE_ORDER.index(r.get("state", "failed")), reverse=True):
        key = f"{row['model']}/{row['precision']}"
        if key in states:
            states[key] = {k: row.get(k) for k in _VARIANT_FIELDS}
    return states


@router.get("/readyz", responses={503: {"description": "not ready: the same body, with the failing checks",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}})
async def readyz(svc: Svc) -> JSONResponse:
    """API: queue reachable and accepting. With an embedded worker also: at least one variant serving.

    `models` shows every variant's state, so a precision still calibrating or compiling is visible here.
    """
    checks = {"queue": await svc.backend.ping(), "accepting": svc.accepting}
    if svc.worker is not None:
        checks["worker"] = svc.worker.ready
    body = {"status": "ready" if all(checks.values()) else "not ready", "checks": checks,
            "models": await variant_states(svc)}
    if svc.worker is not None and svc.worker.error:
        body["error"] = svc.worker.error
    return JSONResponse(body, status_code=200 if all(checks.values()) else 503)


@router.get("/startupz", responses={503: {"description": "still starting: the same body",
                                        "content": {"application/json": {"schema": {"type": "object"}}}}})
async def startupz(svc: Svc) -> JSONResponse:
    """Passes once start-up work (loading, quantizing, warm-up) is over, so liveness checks can begin."""
    started = svc.worker is None or svc.worker.started
    state = svc.worker.state if svc.worker is not None else "api"
    return JSONResponse({"started": started, "state": state}, status_code=200 if started else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(svc: Svc) -> Response:
    m = svc.metrics
    try:
        for model in svc.models:
            for precision in svc.precisions:
                stream = stream_name(model, precision)
                m.queue_depth.labels(stream).set(await svc.store.depth(stream))
        m.workers_ready.set(sum(1 for w in await svc.bus.workers() if w.get("ready")))
    except QueueUnavailable:
        pass  # the gauges keep their last values; the counters are still worth scraping
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
