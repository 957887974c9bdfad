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

Job records catch up with task states whenever jobs are read (one job or the
list) and at every janitor sweep, so finished jobs expire even if nobody
fetched them.
"""

from __future__ import annotations

import json
import logging
import threading

import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from app.export import SUMMARY
from app.server import scratch
from app.server.jobs import FINAL, Job, JobStore, QueueFull, QueueUnavailable, ResultStore
from app.server.metrics import Metrics
from app.server.settings import ServerSettings
from app.server.worker import Outcome, brief, internal_error, record, run_job

log = logging.getLogger(__name__)
# What an unreachable broker raises: kombu and redis-py errors while publishing, and the RuntimeError
# Celery's Redis result backend raises once its reconnect retries are spent.
BROKER_ERRORS = (OperationalError, redis.RedisError, OSError, RuntimeError)
TASK = "autocontour.segment"
QUEUE = "autocontour"


def _key(kind: str, job_id: str) -> str:
    return f"autocontour:{kind}:{job_id}"


def make_celery(settings: ServerSettings, api: bool = False) -> Celery:
    """`api=True`: the API process gives up on an unreachable broker within seconds (the caller gets 503
    and retries); workers keep Celery's patient reconnects, so a Redis restart costs them no result."""
    app = Celery("autocontour", broker=settings.broker_url, backend=settings.broker_url)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    backend_transport = dict(transport)
    if api:
        backend_transport["retry_policy"] = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                             "interval_max": 1}
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, task_default_queue=QUEUE, task_serializer="json", result_serializer="json",
        accept_content=["json"], result_expires=settings.result_ttl_s, broker_transport_options=transport,
        result_backend_transport_options=backend_transport, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


class CeleryQueue:
    """The API side: submit, cancel, and turn task states into job records."""

    owns_model = False

    def __init__(self, settings: ServerSettings, jobs: JobStore, results: ResultStore, metrics: Metrics):
        self.settings, self.jobs, self.results, self.metrics = settings, jobs, results, metrics
        self.app = make_celery(settings, api=True)
        self.redis = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
        self._submit_lock = threading.Lock()

    def start(self, segmenter) -> None:
        pass

    def stop(self) -> None:
        self.app.close()

    def submit(self, options: dict, owner: str | None, input_name: str, job_id: str) -> Job:
        # the broker's queue is the true depth (the jobs table learns of starts late): count and send
        # under one lock so that concurrent uploads to this API process cannot overfill it
        with self._submit_lock:
            if self.depth() >= self.settings.max_queue:
                raise QueueFull(f"{self.settings.max_queue} jobs are waiting")
            job = self.jobs.create(options, owner, input_name, job_id)
            try:  # a few quick retries, then the caller hears 503 instead of waiting on a dead broker
                self.app.send_task(TASK, args=[job.id, options, input_name], task_id=job.id, retry=True,
                                   retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
            except BROKER_ERRORS as exc:
                self.jobs.delete(job.id)  # never accepted: no job left "queued" forever
                log.warning("broker unavailable, job refused: %s", type(exc).__name__)
                raise QueueUnavailable("the job queue's broker cannot be reached") from exc
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

    def checks(self) -> dict[str, bool]:
        """Whether the broker answers, and whether at least one worker replies to a ping."""
        try:
            self.redis.ping()
        except (redis.RedisError, OSError):
            return {"broker_reachable": False, "worker_running": False}
        try:
            workers = bool(self.app.control.ping(timeout=1.0))
        except (redis.RedisError, OSError):
            workers = False
        return {"broker_reachable": True, "worker_running": workers}

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        return self.refresh([job])[0] if job is not None else None

    def refresh(self, jobs: list[Job]) -> list[Job]:
        """Turn the task states of unfinished jobs into job records (finished ones are left alone).

        Used by every read of jobs (one job, the list) and by the janitor, so that no job stays
        "queued" in the table just because nobody asked for it. With the broker down, the jobs not
        yet read are returned as the table has them (one warning, not one timeout per job).
        """
        out = []
        for i, job in enumerate(jobs):
            if job.status in FINAL:
                out.append(job)
                continue
            try:
                out.append(self._sync(job))
            except (redis.RedisError, OSError) as exc:  # broker down: report what we know
                log.warning("cannot read task states (%d job(s) left as recorded): %s", len(jobs) - i, exc)
                return out + jobs[i:]
        return out

    def _sync(self, job: Job) -> Job:
        task = AsyncResult(job.id, app=self.app)
        state, info = task.state, task.info
        if state in ("STARTED", "PROGRESS"):
            if job.status != "running":
                self.jobs.mark_running(job.id)
            if isinstance(info, dict) and info.get("progress") and info["progress"] != job.progress:
                self.jobs.set_progress(job.id, info["progress"])
        elif state == "SUCCESS" and isinstance(info, dict):
            record(self.jobs, job.id, Outcome(**info), self.metrics)
        elif state == "FAILURE":
            record(self.jobs, job.id, Outcome("failed", error=internal_error(
                "the worker failed unexpectedly; its log has details")), self.metrics)
        else:  # PENDING (waiting in the broker) or unknown: nothing new
            return job
        return self.jobs.get(job.id) or job


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
    scratch.sweep(settings.data_dir)  # patient data of processes that were killed
    settings.scratch_dir = scratch.Scratch(settings.data_dir).path  # this worker's, for its lifetime
    results = ResultStore(settings.data_dir, settings.scratch_dir)
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=30)

    @app.task(name=TASK, bind=True)
    def segment(self, job_id: str, options: dict, input_name: str) -> dict:
        attempts = client.incr(_key("attempts", job_id))
        client.expire(_key("attempts", job_id), settings.result_ttl_s)
        if client.exists(_key("cancel", job_id)):
            return Outcome("cancelled").to_dict()
        if results.zip_path(job_id).is_file():  # a redelivery after the result was published: do not redo it
            summary = json.loads((results.result_dir(job_id) / SUMMARY).read_text())
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
