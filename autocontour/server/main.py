"""The HTTP service: FastAPI around the same `Segmenter` the CLI uses.

    autocontour serve --host 0.0.0.0 --port 8000      (or: uvicorn autocontour.server.main:create_app --factory)

The model is loaded once, in the lifespan, by the process that owns the
worker (or, with AUTOCONTOUR_QUEUE=celery, by each worker process instead).
Requests only accept, validate, store and report. Every response carries an
`X-Request-ID`; log lines carry it too, and never a file name or anything
from the image headers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autocontour import __version__, scratch
from autocontour.pipeline import Segmenter
from autocontour.pipeline.library import WORKERS, Library
from autocontour.pipeline.summary import DRAFT_DISCLAIMER
from autocontour.server import openapi, problems
from autocontour.server.context import configure_logging, request_id
from autocontour.server.jobs import FINAL, JobStore, ResultStore
from autocontour.server.metrics import Metrics
from autocontour.server.queue import make_queue
from autocontour.server.review import ReviewCache
from autocontour.server.routers import catalogue, editing, evaluations, health, review, segmentations, support
from autocontour.server.settings import ServerSettings
from autocontour.server.worker import Janitor

log = logging.getLogger("autocontour.server")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodySizeLimit:
    """Refuse request bodies above the limit while they stream in (413), before they fill a disk."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise problems.BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except problems.BodyTooLarge:  # raised where nothing turned it into a response (not a form route)
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = problems.BodyTooLarge(self.limit).problem().response()
        await response({"type": "http"}, None, send)  # type: ignore[arg-type]


def create_app(settings: ServerSettings | None = None, model: Segmenter | Library | None = None) -> FastAPI:
    """The app. `model`: a loaded Segmenter to run jobs with, or a Library for an app that runs none (jobs wait
    in the queue; tests); by default the lifespan loads what the queue needs."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="autocontour",
        version=__version__,
        description="Few-shot, in-context draft contours for cervical-cancer radiotherapy planning CT. "
                    f"{DRAFT_DISCLAIMER} Errors are RFC 9457 problem documents (application/problem+json).",
        lifespan=_lifespan(settings, model),
    )
    problems.install(app)
    openapi.install(app, pacs=bool(settings.pacs_url), keys=bool(settings.api_keys))
    for router in (health.router, catalogue.router, segmentations.router, editing.router, support.router,
                   evaluations.router, review.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=review.STATIC), name="static")
    app.middleware("http")(_observe)
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes)
    return app


def _lifespan(settings: ServerSettings, model: Segmenter | Library | None):
    """Start-up and shut-down: storage, queue, the model where jobs run, the janitor."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging()
        state = app.state
        state.settings = settings
        scratch.sweep(settings.data_dir)  # patient data of processes that were killed
        state.scratch = scratch.Scratch(settings.data_dir)
        settings.scratch_dir = state.scratch.path  # where this process extracts uploads (read_input)
        state.jobs = JobStore(settings.data_dir / "jobs.sqlite3")
        state.results = ResultStore(settings.data_dir, state.scratch.path)
        state.results.sweep_uploads(keep=lambda job_id: _unfinished(state.jobs, job_id))
        state.decodes = threading.BoundedSemaphore(settings.max_concurrent_decodes)
        state.metrics = Metrics(lambda: state.queue.depth(), _gpu_memory_probe())
        state.review = ReviewCache()
        state.queue = make_queue(settings, state.jobs, state.results, state.metrics)
        state.segmenter, state.library = _load(settings, model, state.queue.owns_model)
        if settings.warmup and state.segmenter:
            state.segmenter.warm_up()
        state.queue.start(state.segmenter)
        janitor = Janitor(state.jobs, state.results, settings.result_ttl_s, refresh=state.queue.refresh)
        janitor.start()
        log.info("ready: model %s on %s", state.library.card.name,
                 state.segmenter.model.device_name if state.segmenter else WORKERS)
        yield
        janitor.stop()
        state.queue.stop()
        state.jobs.close()
        state.scratch.close()

    return lifespan


def _load(settings: ServerSettings, model: Segmenter | Library | None, owns_model: bool
          ) -> tuple[Segmenter | None, Library]:
    """The network loads where jobs run: here (local queue) or in the workers (Celery), where this process
    keeps only the library (card, support sets, rules) to check and describe."""
    if model is None:
        model = Segmenter(settings) if owns_model else Library(settings)
    return (model, model.library) if isinstance(model, Segmenter) else (None, model)


async def _observe(request: Request, call_next):
    """Request ids, metrics and the access log; an unhandled error becomes a problem document."""
    incoming = request.headers.get("x-request-id", "")
    token = request_id.set(incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex)
    started = time.perf_counter()
    try:
        try:
            upload = request.method == "POST" and request.url.path == "/v1/segmentations"
            full = _queue_full(request) if upload else None
            response = full or await call_next(request)
        except Exception:  # a bug: answered as a problem document, counted, and logged with the request id
            log.exception("%s %s failed", request.method, request.url.path)
            response = problems.internal_error_response()
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - started
        request.app.state.metrics.requests.labels(request.method, template, str(response.status_code)).inc()
        request.app.state.metrics.latency.labels(template).observe(elapsed)
        response.headers["X-Request-ID"] = request_id.get()
        log.info("%s %s -> %d in %.3f s", request.method, template, response.status_code, elapsed)
        return response
    finally:
        request_id.reset(token)


def _queue_full(request: Request):
    """An early refusal, before the body is read; `JobQueue.submit` checks again, atomically."""
    state = request.app.state
    if state.queue.depth() >= state.settings.max_queue:
        return problems.queue_full(state.settings.max_queue, state.settings.retry_after_s).response()
    return None


def _unfinished(jobs: JobStore, job_id: str) -> bool:
    job = jobs.get(job_id)
    return job is not None and job.status not in FINAL


def _gpu_memory_probe():
    import torch

    if not torch.cuda.is_available():
        return None
    return lambda: float(torch.cuda.memory_allocated())
