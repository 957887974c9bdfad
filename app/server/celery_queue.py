"""Distributed mode: jobs are Celery tasks on a Redis broker; GPU workers each own a model.

    AUTOCONTOUR_QUEUE=celery AUTOCONTOUR_BROKER_URL=redis://redis:6379/0 autocontour serve   # API
    AUTOCONTOUR_QUEUE=celery AUTOCONTOUR_BROKER_URL=redis://redis:6379/0 autocontour worker  # per GPU

The API process accepts, validates, stores the upload in the shared results
folder, records the job (SQLite) and sends a task whose id is the job id. A
worker (`autocontour worker`, solo pool: the model lives in the process that
runs the task) loads the model once, runs `run_job`, reports progress through
the task state and returns the outcome, which the API records when it sees
it. Nothing is lost:

- late acknowledgement: a task is acknowledged only after it finished, and a
  worker that dies mid-job leaves it unacknowledged; Redis hands it to another
  worker after the visibility timeout (keep it above the longest job);
- results are published by one rename, and a redelivered task whose result
  already exists returns it instead of recomputing (idempotent writes);
- each delivery is counted in Redis; past `max_attempts` the job fails with a
  clear reason instead of looping;
- with Redis persistence (AOF), a Redis restart keeps every queued task.
"""

from __future__ import annotations

import json
import logging

import redis
from celery import Celery
from celery.result import AsyncResult

from app.server.jobs import FINAL, Job, JobStore, ResultStore
from app.server.metrics import Metrics
from app.server.settings import ServerSettings
from app.server.worker import Outcome, brief, record, run_job

log = logging.getLogger(__name__)
TASK = "autocontour.segment"
QUEUE = "autocontour"


def _key(kind: str, job_id: str) -> str:
    return f"autocontour:{kind}:{job_id}"


def make_celery(settings: ServerSettings) -> Celery:
    app = Celery("autocontour", broker=settings.broker_url, backend=settings.broker_url)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, task_default_queue=QUEUE, task_serializer="json", result_serializer="json",
        accept_content=["json"], result_expires=settings.result_ttl_s, broker_transport_options=transport,
        result_backend_transport_options=transport, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


class CeleryQueue:
    """The API side: submit, cancel, and turn task states into job records."""

    owns_model = False

    def __init__(self, settings: ServerSettings, jobs: JobStore, results: ResultStore, metrics: Metrics):
        self.settings, self.jobs, self.results, self.metrics = settings, jobs, results, metrics
        self.app = make_celery(settings)
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=5)

    def start(self, segmenter) -> None:
        pass

    def stop(self) -> None:
        self.app.close()

    def submit(self, options: dict, owner: str | None, input_name: str, job_id: str) -> Job:
        job = self.jobs.create(options, owner, input_name, job_id)
        self.app.send_task(TASK, args=[job.id, options, input_name], task_id=job.id)
        return job

    def cancel(self, job_id: str) -> None:
        self.redis.set(_key("cancel", job_id), 1, ex=self.settings.result_ttl_s)
        self.jobs.cancel(job_id)
        self.app.control.revoke(job_id)

    def depth(self) -> int:
        try:
            return int(self.redis.llen(QUEUE))
        except redis.RedisError:
            return 0

    def alive(self) -> bool:
        """The broker answers and at least one worker replies to a ping."""
        try:
            self.redis.ping()
            return bool(self.app.control.ping(timeout=1.0))
        except (redis.RedisError, OSError):
            return False

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.status in FINAL:
            return job
        try:
            task = AsyncResult(job_id, app=self.app)
            state, info = task.state, task.info
        except (redis.RedisError, OSError) as exc:  # broker down: report what we know
            log.warning("cannot read task state of %s: %s", job_id, exc)
            return job
        if state in ("STARTED", "PROGRESS"):
            self.jobs.mark_running(job_id)
            if isinstance(info, dict) and info.get("progress"):
                self.jobs.set_progress(job_id, info["progress"])
        elif state == "SUCCESS" and isinstance(info, dict):
            record(self.jobs, job_id, Outcome(**info), self.metrics)
        elif state == "FAILURE":
            record(self.jobs, job_id, Outcome("failed", error={
                "type": "urn:autocontour:problem:internal-error", "title": "Internal error", "status": 500,
                "detail": "the worker failed unexpectedly; its log has details"}), self.metrics)
        return self.jobs.get(job_id)


class _TaskReporter:
    def __init__(self, task, client: redis.Redis, job_id: str):
        self.task, self.redis, self.job_id = task, client, job_id

    def progress(self, progress: dict) -> None:
        self.task.update_state(state="PROGRESS", meta={"progress": progress | {"worker": self.task.request.hostname}})

    def cancel_requested(self) -> bool:
        return bool(self.redis.exists(_key("cancel", self.job_id)))


def worker_app(settings: ServerSettings, segmenter) -> Celery:
    """The worker side: a Celery app whose one task runs jobs with this process's model."""
    app = make_celery(settings)
    results = ResultStore(settings.data_dir)
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=30)

    @app.task(name=TASK, bind=True)
    def segment(self, job_id: str, options: dict, input_name: str) -> dict:
        attempts = client.incr(_key("attempts", job_id))
        client.expire(_key("attempts", job_id), settings.result_ttl_s)
        if client.exists(_key("cancel", job_id)):
            return Outcome("cancelled").to_dict()
        if results.zip_path(job_id).is_file():  # a redelivery after the result was published: do not redo it
            summary = json.loads((results.result_dir(job_id) / "summary.json").read_text())
            return Outcome("done", result=brief(summary)).to_dict()
        if attempts > settings.max_attempts:
            return Outcome("failed", error={
                "type": "urn:autocontour:problem:interrupted", "title": "Interrupted too often", "status": 500,
                "detail": f"the workers running this job stopped {attempts - 1} times"}).to_dict()
        self.update_state(state="STARTED", meta={"progress": {"worker": self.request.hostname, "attempt": attempts}})
        outcome = run_job(segmenter, results, job_id, options, input_name, _TaskReporter(self, client, job_id),
                          settings)
        if outcome.result is not None:
            outcome.result["worker"] = self.request.hostname
        return outcome.to_dict()

    return app
