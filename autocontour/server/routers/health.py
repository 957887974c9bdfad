"""/healthz (alive), /readyz (model, queue, storage), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from autocontour.server.dependencies import MetricsDep, QueueDep, ResultsDep, SegmenterDep
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
def readyz(segmenter: SegmenterDep, queue: QueueDep, results: ResultsDep):
    """Ready to accept work. With the embedded worker: model loaded in this process, worker running, storage
    writable. With Celery: the model card loaded here (the network runs in the workers), broker reachable, a
    worker answering, storage writable."""
    if queue.owns_model:
        model = f"loaded in this process ({segmenter.model.device_name})" if segmenter else "not loaded"
        checks = {"model_loaded": segmenter is not None}
    else:
        model = WORKERS_MODEL
        checks = {"model_card_loaded": True}  # the lifespan read it, or the app would not have started
    checks |= queue.checks() | {"storage_writable": results.writable()}
    ready = all(checks.values())
    body = Readiness(status="ready" if ready else "not ready", model=model, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "the Prometheus text exposition format"}})
def metrics(registry: MetricsDep):
    """Prometheus metrics: requests, latency, queue depth, jobs, job seconds, slices per second, GPU memory."""
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
