"""Running jobs: the one function that executes a job, and the in-process worker thread.

`run_job` is shared by every queue backend (the local thread here, Celery
workers in `app.server.celery_queue`), so a job runs the same way everywhere:
the upload goes through `Segmenter.segment` into a staging folder, which is
published in one rename with its zip; progress and cancellation go through the
job store. A result is written completely or not at all, so retrying a job is
safe.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from app.errors import AutocontourError
from app.pipeline import CancelledError, Segmenter
from app.server.jobs import FINAL, JobStore, ResultStore
from app.server.metrics import Metrics
from app.server.problems import from_error

log = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 0.5


def brief(summary: dict) -> dict:
    """What the job resource shows of a finished result."""
    return {
        "structures": {n: {k: s[k] for k in ("status", "volume_ml", "confidence", "slice_range", "z_range_mm")}
                       | {"flagged_slices": len(s["flagged_slices"]), "support_set": s["support_set"]["id"]}
                       for n, s in summary["structures"].items()},
        "timings_s": summary["timings_s"], "warnings": summary["warnings"], "notices": summary["notices"],
        "model": {k: summary["model"][k] for k in ("name", "version", "sha256", "licence", "device", "precision")},
        "rule_changes": summary["rule_changes"],
        "files": {k: v for k, v in summary["files"].items() if k in ("rtstruct", "seg")},
    }


def fetch_from_pacs(settings, job, target: Path) -> None:
    """Download a PACS job's CT series into its upload folder (done by the worker, not the request)."""
    from app.dicom import pacs

    client = pacs.connect(settings.pacs_url, settings.pacs_username, settings.pacs_password)
    spec = job.options["pacs"]
    series_uid = pacs.find_ct_series(client, spec["study_uid"], spec["series_uid"])
    pacs.fetch_series(client, spec["study_uid"], series_uid, target)


def push_to_pacs(settings, result_dir: Path, files: dict) -> None:
    from app.dicom import pacs

    client = pacs.connect(settings.pacs_url, settings.pacs_username, settings.pacs_password)
    pacs.store(client, [result_dir / files[k] for k in ("rtstruct", "seg") if k in files])


def run_job(segmenter: Segmenter, store: JobStore, results: ResultStore, job_id: str,
            metrics: Metrics | None = None, settings=None) -> str:
    """Execute one claimed job to its final status; returns that status."""
    job = store.get(job_id)
    if job is None or job.status in FINAL:
        return job.status if job else "missing"
    started = time.perf_counter()
    last_update = [0.0]
    staging = results.staging_dir(job.id)

    def progress(phase: str, done: dict[str, int], total: dict[str, int]) -> None:
        now = time.perf_counter()
        if now - last_update[0] < PROGRESS_INTERVAL_S and sum(done.values()) < sum(total.values()):
            return
        last_update[0] = now
        store.set_progress(job.id, {"phase": phase, "slices_done": sum(done.values()),
                                    "slices_total": sum(total.values()),
                                    "structures": {n: {"done": done.get(n, 0), "total": t} for n, t in total.items()}})

    options = dict(job.options)
    pacs_job = options.pop("pacs", None)
    try:
        if pacs_job:
            fetch_from_pacs(settings, job, results.upload_path(job.id, job.input_name))
        result = segmenter.segment(results.upload_path(job.id, job.input_name), staging,
                                   options.pop("structures"), save_probabilities=options.pop("probabilities", False),
                                   progress=progress, cancelled=lambda: store.cancel_requested(job.id), **options)
        results.publish(job.id, staging)
        summary = brief(result.summary)
        if pacs_job and pacs_job["push"] and summary["files"]:
            push_to_pacs(settings, results.result_dir(job.id), summary["files"])
            summary["pushed_to_pacs"] = sorted(summary["files"].values())
        store.finish(job.id, summary)
        results.delete_upload(job.id)
        status = "done"
        slices = sum(s["slices_computed"] for s in result.summary["structures"].values())
        if metrics:
            metrics.slices.inc(slices)
            metrics.slices_per_second.set(slices / max(result.summary["timings_s"]["inference"], 1e-6))
    except CancelledError:
        store.mark_cancelled(job.id)
        results.delete_upload(job.id)
        status = "cancelled"
    except AutocontourError as exc:
        store.fail(job.id, from_error(exc))
        results.delete_upload(job.id)
        status = "failed"
    except Exception:  # a bug: keep the server alive, record it, keep the details in the log
        log.exception("job %s failed", job.id)
        store.fail(job.id, {"type": "urn:autocontour:problem:internal-error", "title": "Internal error",
                            "status": 500, "detail": "segmentation failed unexpectedly; the server log has details"})
        status = "failed"
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published
    if metrics:
        metrics.jobs.labels(status).inc()
        metrics.job_seconds.observe(time.perf_counter() - started)
    log.info("job %s %s in %.1f s", job.id, status, time.perf_counter() - started)
    return status


class LocalWorker:
    """The one thread that owns the model: takes queued jobs oldest first, one at a time."""

    def __init__(self, segmenter: Segmenter, store: JobStore, results: ResultStore, metrics: Metrics, settings):
        self.segmenter, self.store, self.results, self.metrics = segmenter, store, results, metrics
        self.settings = settings
        self.result_ttl_s = settings.result_ttl_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autocontour-worker", daemon=True)
        self._last_cleanup = 0.0

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
            self._expire()
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            run_job(self.segmenter, self.store, self.results, job.id, self.metrics, self.settings)

    def _expire(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup < 60:
            return
        self._last_cleanup = now
        for job_id in self.store.expired(self.result_ttl_s):
            self.results.delete(job_id)
            self.store.delete(job_id)
