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
- every worker writes a heartbeat to Redis from a thread of its own (a busy
  solo-pool worker cannot answer a ping); the API reads them for /readyz and
  /metrics, and when a worker's heartbeat stops (AUTOCONTOUR_WORKER_TIMEOUT_S)
  while it held a job, the API hands that job's message back to the queue
  at once rather than at the visibility timeout's next sweep, and says so in
  the job record;
- with Redis persistence (AOF), a Redis restart keeps every queued task,
  and running jobs go on through it: a worker skips progress writes and
  cancel checks while Redis is away, keeps the upload until the job has
  ended, and retries storing the outcome until Redis is back (10 minutes at
  most); a job redelivered after its outcome was lost fails saying so.

Job records catch up with task states whenever jobs are read (one job or the
list) and at every janitor sweep, so finished jobs expire even if nobody
fetched them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, cast

import redis
from celery import Celery, signals
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from autocontour import scratch
from autocontour.export import SUMMARY
from autocontour.pipeline import Segmenter
from autocontour.pipeline.editing import Edit
from autocontour.pipeline.summary import Summary
from autocontour.server.editing import EditRequest, EditTimeout, run_edit
from autocontour.server.jobs import FINAL, Job, JobStore, QueueFull, QueueUnavailable, ResultStore, job_request_id
from autocontour.server.metrics import Metrics
from autocontour.server.problems import problem_body
from autocontour.server.settings import ServerSettings
from autocontour.server.worker import Outcome, brief, internal_error, record, run_job

log = logging.getLogger(__name__)
# What an unreachable broker raises: kombu and redis-py errors while publishing, and the RuntimeError
# Celery's Redis result backend raises once its reconnect retries are spent.
BROKER_ERRORS = (OperationalError, redis.RedisError, OSError, RuntimeError)
TASK = "autocontour.segment"
QUEUE = "autocontour"
EDIT_TASK = "autocontour.edit"
EDIT_QUEUE = "autocontour-edits"  # apart from the jobs: an edit does not wait behind queued segmentations
WORKERS = "autocontour:workers"  # the set of worker names; each has a heartbeat key that expires
HEARTBEAT_S = 2.0
UNACKED = "unacked"  # kombu's Redis hash of delivered, unacknowledged messages (its default name)
OUTCOME_RETRIES = 300  # how often a worker retries storing an outcome while the broker is away


def _key(kind: str, job_id: str) -> str:
    return f"autocontour:{kind}:{job_id}"


def make_celery(settings: ServerSettings, api: bool = False) -> Celery:
    """`api=True`: the API process gives up on an unreachable broker within seconds (the caller gets 503
    and retries); workers keep Celery's patient reconnects, so a Redis restart costs them no result."""
    app = Celery("autocontour", broker=settings.broker_url, backend=settings.broker_url)
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    backend_transport = dict(transport)
    # kombu's own sweep for messages past the visibility timeout, every 10 s rather than every 100 s
    transport |= {"unacked_restore_interval": 10, "unacked_restore_throttle": 1}
    if api:
        backend_transport["retry_policy"] = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                             "interval_max": 1}
    else:  # a worker waits for a restarting broker to store its outcome (every 2 s at most, for 10 minutes)
        app.conf.update(result_backend_always_retry=True, result_backend_max_retries=OUTCOME_RETRIES,
                        result_backend_max_sleep_between_retries_ms=2000)
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
        # readiness and heartbeats: a healthy Redis answers in a millisecond, a sick one must not hold a probe
        self.probe = redis.Redis.from_url(settings.broker_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._submit_lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_workers, name="autocontour-worker-monitor", daemon=True)
        metrics.registry.register(WorkerCollector(self))
        self.requeued = Counter("autocontour_jobs_requeued", "jobs handed back to the queue because their worker "
                                "stopped", registry=metrics.registry)
        self.without_worker = Counter("autocontour_uploads_without_worker", "jobs accepted while no worker was alive",
                                      registry=metrics.registry)

    def start(self, segmenter: Segmenter | None) -> None:
        self._monitor.start()  # the network runs in the workers, never here

    def stop(self) -> None:
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(5)
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
        if not any(self._alive_workers().values()):
            log.warning("job %s accepted while no worker is alive: it waits in the queue", job.id)
            self.without_worker.inc()
            self.jobs.add_note(job.id, "no worker was alive when this job was accepted: it waits in the queue "
                                       "until a worker starts")
            job = self.jobs.get(job.id) or job
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
        """Whether the broker answers, and whether at least one worker's heartbeat is fresh (busy or not)."""
        try:
            alive = self._alive_workers()
        except (redis.RedisError, OSError):
            return {"broker_reachable": False, "worker_running": False}
        return {"broker_reachable": True, "worker_running": any(alive.values())}

    def workers(self) -> dict[str, dict | None]:
        """Each known worker's last heartbeat (its figures), None for one whose heartbeat expired."""
        members = cast(set[bytes], self.probe.smembers(WORKERS))  # a client without decode_responses: bytes
        names = sorted(n.decode() for n in members)
        beats = self.probe.mget([_key("worker", n) for n in names]) if names else []
        return {n: json.loads(b) if b else None for n, b in zip(names, beats, strict=True)}

    def _alive_workers(self) -> dict[str, bool]:
        return {n: beat is not None for n, beat in self.workers().items()}

    def _watch_workers(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                for name, beat in self.workers().items():
                    if beat is None:
                        self._worker_gone(name)
            except (redis.RedisError, OSError) as exc:  # the broker is down: nothing can be redelivered now
                log.debug("worker monitor: %s", exc)
            except Exception:  # keep watching: the next round retries
                log.exception("worker monitor failed")

    def _worker_gone(self, name: str) -> None:
        """A worker's heartbeat expired: hand its job (if any) back to the queue now, and forget the worker."""
        held = self.probe.get(_key("running", name))
        if held:
            running = json.loads(held)
            job_id, attempt = running["job"], running["attempt"]
            restored = self._restore_message(job_id)
            # the task state still says STARTED on the dead worker: say what happened instead
            progress = {"attempt": attempt, "worker": None}
            AsyncResult(job_id, app=self.app).backend.store_result(job_id, {"progress": progress}, "REQUEUED")
            note = (f"worker {name} stopped during attempt {attempt} (no heartbeat for "
                    f"{self.settings.worker_timeout_s} s): the job went back to the queue for another worker")
            if self.jobs.requeue(job_id, progress, note):
                self.requeued.inc()
            log.warning("worker %s stopped during job %s (attempt %d); %s", name, job_id, attempt,
                        "its message was handed back to the queue" if restored else "no message was left to hand back")
        self.probe.delete(_key("running", name))
        self.probe.srem(WORKERS, name)

    def _restore_message(self, job_id: str) -> bool:
        """Put the job's unacknowledged message back on the queue (kombu's own restore, by delivery tag)."""
        for tag, raw in self.probe.hgetall(UNACKED).items():
            message = json.loads(raw)[0]
            if message.get("headers", {}).get("id") == job_id:
                with self.app.connection_for_write() as connection:
                    connection.default_channel.qos.restore_by_tag(tag)
                return True
        return False

    def get(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        return self.refresh([job])[0] if job is not None else None

    def edit(self, request: EditRequest, edit: Edit) -> dict:
        """A task on the edit queue, answered by the first free worker (the checked `edit` stays here: the
        worker reads the drawn mask from the shared folder); revoked if no answer comes in time."""
        try:
            if not any(self._alive_workers().values()):
                raise QueueUnavailable("no worker is alive to run the edit")
            task = self.app.send_task(EDIT_TASK, args=[request.model_dump()], queue=EDIT_QUEUE, retry=True,
                                      retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
        except BROKER_ERRORS as exc:
            raise QueueUnavailable("the job queue's broker cannot be reached") from exc
        try:
            answer = task.get(timeout=self.settings.edit_timeout_s, propagate=False, disable_sync_subtasks=False)
        except CeleryTimeout:
            self.app.control.revoke(task.id)
            raise EditTimeout(f"no worker answered within {self.settings.edit_timeout_s:g} s") from None
        if not isinstance(answer, dict):  # the task raised: a bug in the worker, its log has the details
            raise RuntimeError(f"the edit failed in the worker: {type(answer).__name__}")
        return answer

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
                "the worker failed unexpectedly; its log has details", job_request_id(job.id, job.options))),
                self.metrics)
        else:  # PENDING (waiting in the broker) or unknown: nothing new
            return job
        return self.jobs.get(job.id) or job


class WorkerCollector:
    """Per-worker figures in /metrics, from the workers' heartbeats (read when scraped)."""

    def __init__(self, queue: CeleryQueue):
        self.queue = queue

    def describe(self):
        return []

    def collect(self):
        up = GaugeMetricFamily("autocontour_worker_up", "1 while the worker's heartbeat is fresh", labels=["worker"])
        busy = GaugeMetricFamily("autocontour_worker_busy", "1 while the worker runs a job", labels=["worker"])
        jobs = CounterMetricFamily("autocontour_worker_jobs", "jobs the worker finished since it started, by outcome",
                                   labels=["worker", "status"])
        busy_s = CounterMetricFamily("autocontour_worker_busy_seconds", "seconds the worker spent running jobs",
                                     labels=["worker"])
        alive = GaugeMetricFamily("autocontour_workers_alive", "workers whose heartbeat is fresh")
        try:
            workers = self.queue.workers()
        except (redis.RedisError, OSError):
            workers = {}
        for name, beat in workers.items():
            up.add_metric([name], 1 if beat else 0)
            if beat:
                busy.add_metric([name], 1 if beat["job"] else 0)
                busy_s.add_metric([name], beat["busy_s"])
                for status, count in beat["jobs"].items():
                    jobs.add_metric([name, status], count)
        alive.add_metric([], sum(1 for b in workers.values() if b))
        yield from (up, busy, jobs, busy_s, alive)


class Heartbeat:
    """A worker's liveness and figures in Redis, written every HEARTBEAT_S by a thread of its own.

    The key expires after AUTOCONTOUR_WORKER_TIMEOUT_S: a worker killed with -9 simply stops renewing it.
    The job in hand is kept under a key that does not expire, so the API can hand it back to the queue.
    """

    def __init__(self, client: redis.Redis, timeout_s: int):
        self.client, self.timeout_s = client, timeout_s
        self.name: str | None = None
        self.job: str | None = None
        self.attempt: int | None = None
        self.jobs: dict[str, int] = {}
        self.busy_s = 0.0
        self._since = 0.0
        self._lock = threading.RLock()  # a beat between a job's start and its `running` key would clear that key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autocontour-heartbeat", daemon=True)

    def _own(self, kind: str) -> str:
        """This worker's key of a kind (named at start(); Celery runs no task before its worker is ready)."""
        return _key(kind, self.name or "unnamed")

    def start(self, name: str) -> None:
        self.name = name
        self.client.sadd(WORKERS, name)
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        """A clean shutdown: the worker is gone from the API's view at once."""
        self._stop.set()
        if self.name:
            self.client.delete(_key("worker", self.name))
            self.client.srem(WORKERS, self.name)

    def running(self, job_id: str, attempt: int) -> None:
        with self._lock:
            self.job, self.attempt, self._since = job_id, attempt, time.monotonic()
            self.client.set(self._own("running"), json.dumps({"job": job_id, "attempt": attempt}))
            self.beat()

    def finished(self, status: str) -> None:
        self.jobs[status] = self.jobs.get(status, 0) + 1
        self.busy_s += time.monotonic() - self._since
        self.job = self.attempt = None
        try:
            self.beat()
        except (redis.RedisError, OSError) as exc:  # the broker is away: the next beat says it
            log.warning("heartbeat not written: %s", type(exc).__name__)

    def beat(self) -> None:
        """The figures, and (between jobs) no job in hand: a beat also clears a `running` key that could not be
        cleared when the job ended, with the broker away, so the API never hands back a finished job; and it
        names the worker again in the set of workers, which a Redis restarted without its data has lost."""
        with self._lock, self.client.pipeline() as pipe:
            figures = {"pid": os.getpid(), "job": self.job, "attempt": self.attempt, "jobs": dict(self.jobs),
                       "busy_s": round(self.busy_s + (time.monotonic() - self._since if self.job else 0), 3),
                       "beat": time.time()}
            pipe.set(self._own("worker"), json.dumps(figures), ex=self.timeout_s)
            pipe.sadd(WORKERS, self.name or "unnamed")
            if self.job is None:
                pipe.delete(self._own("running"))
            pipe.execute()

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.beat()
            except (redis.RedisError, OSError) as exc:  # Redis away: the next beat retries
                log.warning("heartbeat not written: %s", type(exc).__name__)


class _TaskReporter:
    """Progress and cancellation through Redis, which may restart while the job runs: the job goes on.

    A progress write is skipped while the broker is away (the next one says more anyway), and a cancel
    that cannot be read is not one; the job's outcome then waits for the broker (OUTCOME_RETRIES).
    """

    def __init__(self, task, client: redis.Redis, job_id: str, attempt: int):
        self.task, self.redis, self.job_id, self.attempt = task, client, job_id, attempt
        self.broker_away = False

    def progress(self, progress: dict) -> None:
        if self._broker_reachable():  # the backend's own write would wait for the broker, holding the job
            self.task.update_state(state="PROGRESS", meta={
                "progress": progress | {"worker": self.task.request.hostname, "attempt": self.attempt}})

    def cancel_requested(self) -> bool:
        try:
            return bool(self.redis.exists(_key("cancel", self.job_id)))
        except BROKER_ERRORS as exc:
            self._away(exc)
            return False

    def _broker_reachable(self) -> bool:
        try:
            self.redis.ping()
        except BROKER_ERRORS as exc:
            self._away(exc)
            return False
        if self.broker_away:
            log.warning("job %s: the broker is back", self.job_id)
            self.broker_away = False
        return True

    def _away(self, exc: Exception) -> None:
        if not self.broker_away:  # once per outage, not at every progress step
            log.warning("job %s goes on while the broker is unreachable (%s)", self.job_id, type(exc).__name__)
            self.broker_away = True


def _outcome_lost(job_id: str, options: dict) -> dict:
    """A redelivered job whose upload is gone: an earlier attempt ended (which removes the upload) but its outcome
    never reached the broker, which was away then; say so rather than "file not found"."""
    return Outcome("failed", error=problem_body(
        500, "interrupted", "Outcome lost",
        "an earlier attempt of this job ended while the job queue's broker was unreachable, and its outcome was "
        "lost with it; the upload is no longer kept: submit the CT again",
        request_id=job_request_id(job_id, options))).to_dict()


def worker_app(settings: ServerSettings, segmenter: Segmenter) -> Celery:
    """The worker side: a Celery app whose one task runs jobs with this process's model."""
    app = make_celery(settings)
    scratch.sweep(settings.data_dir)  # patient data of processes that were killed
    own_scratch = scratch.Scratch(settings.data_dir)
    settings.scratch_dir = own_scratch.path  # this worker's, for its lifetime
    results = ResultStore(settings.data_dir, settings.scratch_dir)
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=30)
    heartbeat = Heartbeat(client, settings.worker_timeout_s)
    # dispatch_uid: one connection however many apps a process builds (tests build several)
    signals.worker_ready.connect(lambda sender, **_: heartbeat.start(sender.hostname), weak=False,
                                 dispatch_uid="autocontour-heartbeat-start")
    def shut_down(**_) -> None:
        heartbeat.stop()
        own_scratch.close()

    signals.worker_shutdown.connect(shut_down, weak=False, dispatch_uid="autocontour-worker-shutdown")

    @app.task(name=EDIT_TASK)
    def edit(request: dict) -> dict:
        with segmenter.engine_lock:
            return run_edit(segmenter.model.engine, results, EditRequest.model_validate(request), settings)

    @app.task(name=TASK, bind=True)
    def segment(self, job_id: str, options: dict, input_name: str) -> dict:
        attempts = client.incr(_key("attempts", job_id))
        client.expire(_key("attempts", job_id), settings.result_ttl_s)
        if client.exists(_key("cancel", job_id)):
            return Outcome("cancelled").to_dict()
        if results.zip_path(job_id).is_file():  # a redelivery after the result was published: do not redo it
            summary = Summary.model_validate_json((results.result_dir(job_id) / SUMMARY).read_text())
            return Outcome("done", result=brief(summary)).to_dict()
        if not options.get("pacs") and not results.upload_path(job_id, input_name).exists():
            return _outcome_lost(job_id, options)
        if attempts > settings.max_attempts:
            return Outcome("failed", error=problem_body(
                500, "interrupted", "Interrupted too often",
                f"the workers running this job stopped {attempts - 1} times",
                request_id=job_request_id(job_id, options))).to_dict()
        self.update_state(state="STARTED", meta={"progress": {"worker": self.request.hostname, "attempt": attempts}})
        heartbeat.running(job_id, attempts)
        outcome = run_job(segmenter, results, job_id, options, input_name,
                          _TaskReporter(self, client, job_id, attempts), settings)
        heartbeat.finished(outcome.status)
        if outcome.result is not None:
            outcome.result["worker"] = self.request.hostname
            outcome.result["attempt"] = attempts
        return outcome.to_dict()

    return app
