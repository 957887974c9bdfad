"""/healthz (alive), /readyz (model, queue, storage), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from autocontour.server.openapi import Readiness

router = APIRouter(tags=["health"])
WORKERS_MODEL = "card loaded; network runs in workers"


@router.get("/healthz")
def healthz():
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness,
            responses={200: {"description": "ready: every check passes"},
                       503: {"model": Readiness, "description": "not ready: a check fails"}})
def readyz(request: Request):
    """Ready to accept work. With the embedded worker: model loaded in this process, worker running, storage
    writable. With Celery: the model card loaded here (the network runs in the workers), broker reachable, a
    worker answering, storage writable."""
    state = request.app.state
    segmenter = state.segmenter
    if state.queue.owns_model:
        loaded = segmenter is not None and segmenter.engine is not None
        model = f"loaded in this process ({segmenter.device_name})" if loaded else "not loaded"
        checks = {"model_loaded": loaded}
    else:
        model = WORKERS_MODEL
        checks = {"model_card_loaded": segmenter is not None and segmenter.card is not None}
    checks |= state.queue.checks() | {"storage_writable": state.results.writable()}
    ready = all(checks.values())
    body = Readiness(status="ready" if ready else "not ready", model=model, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "the Prometheus text exposition format"}})
def metrics(request: Request):
    """Prometheus metrics: requests, latency, queue depth, jobs, job seconds, slices per second, GPU memory."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
