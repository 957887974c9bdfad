"""The job store and result store: restart recovery, cancellation, expiry, atomic publication."""

from __future__ import annotations

import time
import zipfile

from app.server.jobs import MAX_ATTEMPTS, JobStore, ResultStore
from app.server.worker import Janitor


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
    assert reopened.recover() == [a.id]
    job = reopened.get(a.id)
    assert job.status == "queued" and "restarted" in job.notes[0]
    for _ in range(MAX_ATTEMPTS):
        reopened.claim_next()
        reopened.recover()
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
