"""The job store and result store: restart recovery, cancellation, expiry, atomic publication."""

from __future__ import annotations

import concurrent.futures
import time
import zipfile

from autocontour.server.jobs import JobStore, QueueFull, ResultStore
from autocontour.server.worker import Janitor

MAX_ATTEMPTS = 3  # AUTOCONTOUR_MAX_ATTEMPTS's default


def test_claim_order_cancel_and_recovery(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    a = store.create({"structures": ["bladder"]}, "alice", "ct.nii.gz")
    time.sleep(0.01)
    b = store.create({"structures": ["ctvn"]}, None, "ct.nii.gz")
    assert store.queue_depth() == 2
    claimed = store.claim_next()
    assert claimed.id == a.id and claimed.status == "running" and claimed.attempts == 1
    assert store.cancel(b.id) == "cancelled"  # a queued job stops at once
    assert store.cancel(a.id) == "running" and store.cancel_requested(a.id)  # a running one is asked to stop
    store.close()

    reopened = JobStore(tmp_path / "jobs.sqlite3")  # a restart
    assert reopened.recover(MAX_ATTEMPTS) == [a.id]
    job = reopened.get(a.id)
    assert job.status == "queued" and "restarted" in job.notes[0]
    for _ in range(MAX_ATTEMPTS):
        reopened.claim_next()
        reopened.recover(MAX_ATTEMPTS)
    assert reopened.get(a.id).status == "failed" and "stopped during this job" in reopened.get(a.id).error["detail"]
    assert [j.id for j in reopened.list("alice", 10)] == [a.id]


def test_publish_is_atomic_and_janitor_expires(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    results = ResultStore(tmp_path)
    job = store.create({}, None, "ct.nii.gz")
    staging = results.staging_dir(job.id)
    (staging / "bladder.nii.gz").write_bytes(b"mask")
    (staging / "summary.json").write_text("{}")
    (staging / "review").mkdir()
    (staging / "review" / "ct.nii.gz").write_bytes(b"ct")
    results.publish(job.id, staging)
    assert not staging.exists()
    with zipfile.ZipFile(results.zip_path(job.id)) as archive:
        assert sorted(archive.namelist()) == ["bladder.nii.gz", "summary.json"]  # the review CT stays out
    store.claim_next()
    store.finish(job.id, {"ok": True})
    janitor = Janitor(store, results, ttl_s=3600)
    assert janitor.sweep() == 0 and store.get(job.id)
    janitor.ttl_s = 0
    time.sleep(0.01)
    assert janitor.sweep() == 1
    assert store.get(job.id) is None and not results.result_dir(job.id).exists()


def test_create_with_a_bound_never_overfills_the_queue(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: _try_create(store, max_queued=3), range(8)))
    assert outcomes.count("accepted") == 3 and outcomes.count("full") == 5
    assert store.queue_depth() == 3
    store.claim_next()  # a running job no longer waits: one place is free again
    assert _try_create(store, max_queued=3) == "accepted" and _try_create(store, max_queued=3) == "full"


def _try_create(store: JobStore, max_queued: int) -> str:
    try:
        store.create({}, None, "ct.nii.gz", max_queued=max_queued)
        return "accepted"
    except QueueFull:
        return "full"


class FakeTask:
    """Stands in for celery's AsyncResult: task states by job id."""

    states: dict[str, tuple[str, object]] = {}

    def __init__(self, task_id: str, app=None):
        found = self.states.get(task_id, ("PENDING", None))
        if isinstance(found, Exception):
            raise found
        self.state, self.info = found


def test_celery_refresh_updates_jobs_nobody_polled_and_the_janitor_expires_them(tmp_path, monkeypatch):
    from autocontour.server import celery_queue
    from autocontour.server.metrics import Metrics
    from autocontour.server.settings import ServerSettings
    from autocontour.server.worker import Outcome, record

    monkeypatch.setattr(celery_queue, "AsyncResult", FakeTask)
    store, results = JobStore(tmp_path / "jobs.sqlite3"), ResultStore(tmp_path)
    metrics = Metrics(lambda: 0)
    queue = celery_queue.CeleryQueue(ServerSettings(data_dir=tmp_path, broker_url="redis://127.0.0.1:9/0"), store,
                                     results, metrics)
    done, running, waiting, broken = (store.create({"structures": ["bladder"]}, None, "ct.nii.gz") for _ in range(4))
    outcome = Outcome("done", result={"files": {}}, seconds=2.0, slices=10)
    monkeypatch.setattr(FakeTask, "states", {
        done.id: ("SUCCESS", outcome.to_dict()),
        running.id: ("PROGRESS", {"progress": {"slices_done": 3, "worker": "w1"}}),
        broken.id: ("FAILURE", RuntimeError("boom"))})
    janitor = Janitor(store, results, ttl_s=3600, refresh=queue.refresh)
    assert janitor.sweep() == 0
    assert store.get(done.id).status == "done" and store.get(done.id).result == {"files": {}}
    assert store.get(running.id).status == "running" and store.get(running.id).progress["worker"] == "w1"
    assert store.get(waiting.id).status == "queued"
    assert store.get(broken.id).status == "failed" and "worker" in store.get(broken.id).error["detail"]
    record(store, done.id, outcome, metrics)  # seen finished a second time (a poll racing the janitor)
    assert metrics.registry.get_sample_value("autocontour_jobs_total", {"status": "done"}) == 1

    monkeypatch.setattr(FakeTask, "states", {waiting.id: ConnectionError("broker down")})
    listed = store.list(None, 10)
    assert [j.status for j in queue.refresh(listed)] == [j.status for j in listed]  # broker down: as recorded

    janitor.ttl_s = 0
    time.sleep(0.01)
    assert janitor.sweep() == 2 and store.get(done.id) is None and store.get(broken.id) is None
    queue.stop()


def test_job_problem_documents_keep_the_request_id():
    from autocontour.server.worker import internal_error, job_request_id

    error = internal_error("boom", job_request_id("job-1", {"request_id": "req-9"}))
    assert error["request_id"] == "req-9" and error["type"].endswith("internal-error") and error["status"] == 500
    assert job_request_id("job-2", {}) == "job-2"


def test_recovery_failure_is_a_problem_document_with_the_jobs_request_id(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    kept = store.create({"request_id": "req-7"}, None, "ct.nii.gz")
    for _ in range(MAX_ATTEMPTS):
        store.claim_next()
        store.recover(MAX_ATTEMPTS)
    error = store.get(kept.id).error
    assert store.get(kept.id).status == "failed"
    assert error["type"].endswith(":interrupted") and error["status"] == 500 and error["request_id"] == "req-7"
    assert "stopped during this job 3 times" in error["detail"]
