"""Job queues behind one interface: the embedded in-process worker, or Celery (autocontour.server.celery_queue)."""

from __future__ import annotations

import logging
from typing import Protocol

from autocontour.pipeline import Segmenter
from autocontour.pipeline.editing import Edit
from autocontour.server.editing import EditRequest, EditTimeout, run_edit
from autocontour.server.jobs import Job, JobStore, QueueUnavailable, ResultStore
from autocontour.server.metrics import Metrics
from autocontour.server.settings import ServerSettings
from autocontour.server.worker import LocalWorker

log = logging.getLogger(__name__)


class JobQueue(Protocol):
    owns_model: bool  # whether this process runs the jobs (and so loads the model)

    def start(self, segmenter: Segmenter | None) -> None:
        """Start taking jobs; `segmenter`: the network of this process, where it runs jobs."""
    def stop(self) -> None: ...
    def submit(self, options: dict, owner: str | None, input_name: str, job_id: str) -> Job:
        """Record and queue a job; raises QueueFull when `max_queue` jobs wait already (checked atomically)."""
    def cancel(self, job_id: str) -> None: ...
    def checks(self) -> dict[str, bool]:
        """What /readyz reports of the queue: each check by name, True when it passes."""
    def depth(self) -> int: ...
    def get(self, job_id: str) -> Job | None: ...
    def refresh(self, jobs: list[Job]) -> list[Job]:
        """The same jobs, with the unfinished ones brought up to date from wherever jobs run."""
    def edit(self, request: EditRequest, edit: Edit) -> dict:
        """Run a checked edit (`edit`; `request` is its portable form) where the network is, within
        AUTOCONTOUR_EDIT_TIMEOUT_S (EditTimeout), or QueueUnavailable where nothing can run it; returns
        `run_edit`'s answer."""


class LocalQueue:
    """Default: one worker thread in the server process owns the model; jobs wait in SQLite."""

    owns_model = True

    def __init__(self, settings: ServerSettings, jobs: JobStore, results: ResultStore, metrics: Metrics):
        self.settings, self.jobs, self.results, self.metrics = settings, jobs, results, metrics
        self.worker: LocalWorker | None = None
        self.started = False

    def start(self, segmenter: Segmenter | None) -> None:
        """Without a segmenter (an app given only a Library) jobs are accepted and wait: nothing runs them."""
        recovered = self.jobs.recover(self.settings.max_attempts)  # jobs that were running when the process stopped
        if recovered:
            log.info("requeued %d interrupted job(s) after a restart", len(recovered))
        self.started = True
        if segmenter is not None:
            self.worker = LocalWorker(segmenter, self.jobs, self.results, self.metrics, self.settings)
            self.worker.start()

    def stop(self) -> None:
        if self.worker:
            self.worker.stop()

    def submit(self, options: dict, owner: str | None, input_name: str, job_id: str) -> Job:
        if not self.started:
            raise RuntimeError("the local queue takes jobs only after start()")
        job = self.jobs.create(options, owner, input_name, job_id, max_queued=self.settings.max_queue)
        if self.worker:
            self.worker.notify()
        return job

    def cancel(self, job_id: str) -> None:
        self.jobs.cancel(job_id)

    def checks(self) -> dict[str, bool]:
        return {"worker_running": bool(self.worker and self.worker.alive)}

    def depth(self) -> int:
        return self.jobs.queue_depth()

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def refresh(self, jobs: list[Job]) -> list[Job]:
        return jobs  # the worker writes to the store itself: nothing to fetch

    def edit(self, request: EditRequest, edit: Edit) -> dict:
        """In this process, once the worker's job (if any) lets go of the network."""
        if self.worker is None:
            raise QueueUnavailable("no network is loaded in this process to run the edit")
        segmenter = self.worker.segmenter
        if not segmenter.engine_lock.acquire(timeout=self.settings.edit_timeout_s):
            raise EditTimeout(f"the network stayed busy with a job for {self.settings.edit_timeout_s:g} s")
        try:
            return run_edit(segmenter.model.engine, self.results, request, self.settings, edit)
        finally:
            segmenter.engine_lock.release()


def make_queue(settings: ServerSettings, jobs: JobStore, results: ResultStore, metrics: Metrics) -> JobQueue:
    if settings.queue == "celery":
        from autocontour.server.celery_queue import CeleryQueue

        return CeleryQueue(settings, jobs, results, metrics)
    return LocalQueue(settings, jobs, results, metrics)
