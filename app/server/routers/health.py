"""/healthz (alive), /readyz (model, worker, storage), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """Ready to accept work: model loaded, worker running, storage writable."""
    state = request.app.state
    checks = {"model_loaded": state.segmenter is not None, "worker_running": state.queue.alive(),
              "storage_writable": state.results.writable()}
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
