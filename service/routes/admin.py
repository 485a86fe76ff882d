"""/admin: re-quantize, and what every worker serves. Behind a Bearer token; absent without one (404)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, HTTPException, Response

from service.deps import Svc, field_error, require_admin
from service.errors import clip_text
from service.responses import BODY_ERRORS, errors
from service.schemas import Operation, OperationCreated, RequantizeRequest

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=errors(401, 404, 503, e404="no admin token configured (the admin routes do not exist)"))


@router.post("/requantize", status_code=202, response_model=OperationCreated, responses=errors(*BODY_ERRORS))
async def requantize(req: RequantizeRequest, response: Response,
                     svc: Svc) -> OperationCreated:
    """Every worker serving the model finishes its batch, re-quantizes, swaps atomically and reports here."""
    model = req.model or svc.settings.default_model
    if model not in svc.models:
        raise field_error("model", f"unknown model {clip_text(repr(model), 80)}; served: {svc.models}", model)
    if req.precision is not None and req.precision not in svc.precisions:
        raise field_error("precision", f"precision {clip_text(repr(req.precision), 80)} is not served; "
                          f"served: {svc.precisions}", req.precision)
    op_id = uuid.uuid4().hex
    await svc.bus.set_operation(op_id, {"type": "requantize", "model": model, "precision": req.precision,
                                          "created_at": time.time()}, svc.settings.result_ttl_s)
    await svc.bus.publish_control({"type": "requantize", "id": op_id, "model": model,
                                     "precision": req.precision, "calibration": req.calibration})
    response.headers["Location"] = f"/admin/operations/{op_id}"
    return OperationCreated(id=op_id, status="published")


@router.get("/operations/{op_id}", response_model=Operation,
            responses=errors(404, 422, e404="no admin token configured, or unknown operation"))
async def operation(op_id: str, svc: Svc) -> Operation:
    op = await svc.bus.get_operation(op_id)
    if op is None:
        raise HTTPException(404, detail=f"operation {op_id} not found")
    workers = {k.removeprefix("worker:"): v for k, v in op.items() if k.startswith("worker:")}
    return Operation(id=op_id, type=op["type"], model=op["model"], precision=op.get("precision"),
                     created_at=op["created_at"], workers=workers)


@router.get("/models")
async def models(svc: Svc) -> list[dict]:
    """One row per worker and configured variant: model, precision, the variant's state (loading|calibrating|
    compiling|ready|failed, with stage, progress and ETA), and once built its version, calibration hash, backend;
    `worker_state` is the worker's own."""
    rows = []
    for w in await svc.bus.workers():
        for m in w.get("models", []):
            rows.append({"worker": w["id"], "worker_state": w["state"], **m})
    return rows


@router.get("/workers")
async def workers(svc: Svc) -> list[dict]:
    return await svc.bus.workers()
