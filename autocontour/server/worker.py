"""Running jobs: the one function that executes a job, and the in-process worker thread.

`run_job` is shared by every queue backend (the local thread here, Celery
workers in `autocontour.server.celery_queue`), so a job runs the same way everywhere:
the upload goes through `Segmenter.segment` into a staging folder, which is
published in one rename together with its zip. A result is therefore written
completely or not at all, and running a job twice (a redelivered task) is
harmless. Progress and cancellation go through a small `Reporter`; the
outcome is returned, and each backend records it where it keeps job state.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from autocontour.errors import AutocontourError
from autocontour.options import SegmentOptions
from autocontour.pipeline import CancelledError, Segmenter
from autocontour.pipeline.summary import Summary
from autocontour.server.context import request_id
from autocontour.server.jobs import SOURCE, Job, JobStore, ResultStore, job_request_id
from autocontour.server.metrics import Metrics
from autocontour.server.problems import from_error, problem_body

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5
JOB_ONLY = ("pacs", "request_id")  # what a job stores beside its SegmentOptions


class Reporter(Protocol):
    def progress(self, progress: dict) -> None: ...
    def cancel_requested(self) -> bool: ...


@dataclass
class Outcome:
    status: str  # done, failed or cancelled
    result: dict | None = None
    error: dict | None = None
    seconds: float = 0.0
    slices: int = 0
    started_at: float | None = None  # wall-clock times where the job ran, so a record written later is true
    finished_at: float | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "result": self.result, "error": self.error, "seconds": self.seconds,
                "slices": self.slices, "started_at": self.started_at, "finished_at": self.finished_at}


def brief(summary: Summary) -> dict:
    """What the job resource shows of a finished result."""
    return {
        "structures": {n: s.model_dump(include={"status", "volume_ml", "confidence", "slice_range", "z_range_mm"})
                       | {"flagged_slices": len(s.flagged_slices), "support_set": s.support_set["id"]}
                       for n, s in summary.structures.items()},
        "timings_s": summary.timings_s, "warnings": summary.warnings, "notices": summary.notices,
        "model": summary.model.model_dump(include={"name", "version", "sha256", "licence", "device", "precision"}),
        "rule_changes": summary.rule_changes,
        "files": summary.files.dicom(),
    }


def internal_error(detail: str, request: str | None = None) -> dict:
    """A job's error when the code failed, not the input: the details stay in the log. `request`: the
    job's request id where the current context is not the job's (the default is the context's)."""
    extra = {} if request is None else {"request_id": request}
    return problem_body(500, "internal-error", "Internal error", detail, **extra)


def fetch_from_pacs(settings, spec: dict, target: Path) -> None:
    """Download a PACS job's CT series into its upload folder (done by the worker, not the request)."""
    from autocontour.dicom import pacs

    client = pacs.connect(settings.pacs_url, settings.pacs_username, settings.pacs_password)
    series_uid = pacs.find_ct_series(client, spec["study_uid"], spec["series_uid"])
    pacs.fetch_series(client, spec["study_uid"], series_uid, target)


def push_to_pacs(settings, result_dir: Path, files: dict) -> None:
    from autocontour.dicom import pacs

    client = pacs.connect(settings.pacs_url, settings.pacs_username, settings.pacs_password)
    pacs.store(client, [result_dir / files[k] for k in ("rtstruct", "seg") if k in files])


def keep_source(summary: Summary, upload: Path, staging: Path) -> None:
    """A DICOM job keeps its input series beside its result (not in the zip): approving edits later rewrites the
    RTSTRUCT and SEG, which reference every slice of it. A NIfTI job needs only the review CT it keeps anyway."""
    if summary.input.format == "DICOM series":
        (staging / SOURCE).mkdir()
        shutil.move(upload, staging / SOURCE / upload.name)


def run_job(segmenter: Segmenter, results: ResultStore, job_id: str, options: dict, input_name: str,
            reporter: Reporter, settings=None) -> Outcome:
    """Execute one job to its final status."""
    started, started_at = time.perf_counter(), time.time()
    last_update = [0.0]

    def progress(phase: str, done: dict[str, int], total: dict[str, int]) -> None:
        now = time.perf_counter()
        if now - last_update[0] < PROGRESS_INTERVAL_S and sum(done.values()) < sum(total.values()):
            return
        last_update[0] = now
        reporter.progress({"phase": phase, "slices_done": sum(done.values()), "slices_total": sum(total.values()),
                           "structures": {n: {"done": done.get(n, 0), "total": t} for n, t in total.items()}})

    token = request_id.set(job_request_id(job_id, options))
    pacs_job = options.get("pacs")
    staging = results.staging_dir(job_id)
    try:
        segment_options = SegmentOptions.checked({k: v for k, v in options.items() if k not in JOB_ONLY})
        if pacs_job:
            fetch_from_pacs(settings, pacs_job, results.upload_path(job_id, input_name))
        with segmenter.engine_lock:
            result = segmenter.segment(results.upload_path(job_id, input_name), staging, segment_options,
                                       progress=progress, cancelled=reporter.cancel_requested, keep_ct=True)
        keep_source(result.summary, results.upload_path(job_id, input_name), staging)
        results.publish(job_id, staging)
        summary = brief(result.summary)
        if pacs_job and pacs_job["push"] and summary["files"]:
            push_to_pacs(settings, results.result_dir(job_id), summary["files"])
            summary["pushed_to_pacs"] = sorted(summary["files"].values())
        slices = sum(s.slices_computed for s in result.summary.structures.values())
        outcome = Outcome("done", result=summary, slices=slices)
    except CancelledError:
        outcome = Outcome("cancelled")
    except AutocontourError as exc:
        outcome = Outcome("failed", error=from_error(exc))
    except Exception:  # a bug: keep the worker alive, record it, keep the details in the log
        log.exception("job %s failed", job_id)
        outcome = Outcome("failed",
                          error=internal_error("segmentation failed unexpectedly; the server log has details"))
    finally:  # the job has ended, however it ended: no patient data stays behind
        shutil.rmtree(staging, ignore_errors=True)  # already gone when published
        results.delete_upload(job_id)
    outcome.seconds = round(time.perf_counter() - started, 3)
    outcome.started_at, outcome.finished_at = started_at, time.time()
    log.info("job %s %s in %.1f s", job_id, outcome.status, outcome.seconds)
    request_id.reset(token)
    return outcome


def record(store: JobStore, job_id: str, outcome: Outcome, metrics: Metrics | None) -> None:
    """Write an outcome into the job store (and, the first time only, into the metrics)."""
    times = {"started": outcome.started_at, "finished": outcome.finished_at}
    if outcome.status == "done":
        assert outcome.result is not None  # a done outcome carries its result
        changed = store.finish(job_id, outcome.result, **times)
    elif outcome.status == "cancelled":
        changed = store.mark_cancelled(job_id, **times)
    else:
        assert outcome.error is not None  # a failed outcome carries its problem document
        changed = store.fail(job_id, outcome.error, **times)
    if metrics and changed:  # a job seen finished by two refreshes at once counts once
        metrics.jobs.labels(outcome.status).inc()
        metrics.job_seconds.observe(outcome.seconds)
        if outcome.slices:
            metrics.slices.inc(outcome.slices)
            inference = (outcome.result or {}).get("timings_s", {}).get("inference", 0)
            metrics.slices_per_second.set(outcome.slices / max(inference, 1e-6))


class _StoreReporter:
    def __init__(self, store: JobStore, job_id: str):
        self.store, self.job_id = store, job_id

    def progress(self, progress: dict) -> None:
        self.store.set_progress(self.job_id, progress)

    def cancel_requested(self) -> bool:
        return self.store.cancel_requested(self.job_id)


class LocalWorker:
    """The one thread that owns the model: takes queued jobs oldest first, one at a time."""

    def __init__(self, segmenter: Segmenter, store: JobStore, results: ResultStore, metrics: Metrics, settings):
        self.segmenter, self.store, self.results, self.metrics = segmenter, store, results, metrics
        self.settings = settings
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autocontour-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def notify(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            outcome = run_job(self.segmenter, self.results, job.id, job.options, job.input_name,
                              _StoreReporter(self.store, job.id), self.settings)
            record(self.store, job.id, outcome, self.metrics)


class Janitor:
    """Deletes finished jobs and their files once they are older than the configured time to live.

    With `refresh` (the queue's `refresh`), it first brings unfinished jobs up to date, so that jobs
    nobody polls still finish, and so expire, where job state lives outside this process (Celery).
    """

    def __init__(self, store: JobStore, results: ResultStore, ttl_s: float, interval_s: float = 60.0,
                 refresh: Callable[[list[Job]], list[Job]] | None = None):
        self.store, self.results, self.ttl_s, self.interval_s = store, results, ttl_s, interval_s
        self.refresh = refresh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autocontour-janitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sweep(self) -> int:
        if self.refresh is not None:
            self.refresh(self.store.unfinished())
        expired = self.store.expired(self.ttl_s)
        for job_id in expired:
            self.results.delete(job_id)
            self.store.delete(job_id)
        return len(expired)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # keep sweeping: a failed round is retried at the next interval
                log.exception("janitor sweep failed")
