"""Jobs that survive restarts: a SQLite table plus a folder per job.

SQLite (WAL mode) holds each job's status, options, progress, timings and
error; the `ResultStore` holds its files (the upload while it waits, the
results once done). A job is written before the client gets its 202, and a
server that restarts finds every accepted job again: queued ones stay queued,
running ones go back to the queue with a note (or fail, with the reason, after
`AUTOCONTOUR_MAX_ATTEMPTS`). Nothing here stores the uploaded file's name.
"""

from __future__ import annotations

import builtins
import json
import shutil
import sqlite3
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autocontour.server.problems import problem_body

FINAL = ("done", "failed", "cancelled")
SOURCE = "source"  # a DICOM job's input series, kept in its result folder: approval rewrites RTSTRUCT and SEG

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    options TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    result TEXT,
    notes TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    input_name TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, created);
"""


def job_request_id(job_id: str, options: dict) -> str:
    """The id of the request that created a job (its own id for jobs stored without one)."""
    return options.get("request_id", job_id)


class QueueFull(Exception):
    """The queue already holds `max_queue` waiting jobs: the caller should retry later (503 + Retry-After)."""


class QueueUnavailable(Exception):
    """The queue's broker cannot take the job now; nothing was recorded (503 + Retry-After)."""


@dataclass
class Job:
    id: str
    owner: str | None
    status: str
    created: float
    options: dict
    input_name: str
    started: float | None = None
    finished: float | None = None
    progress: dict = field(default_factory=dict)
    error: dict | None = None
    result: dict | None = None
    notes: list[str] = field(default_factory=list)
    attempts: int = 0
    cancel_requested: bool = False

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(id=row["id"], owner=row["owner"], status=row["status"], created=row["created"],
                   options=json.loads(row["options"]), input_name=row["input_name"], started=row["started"],
                   finished=row["finished"], progress=json.loads(row["progress"]),
                   error=json.loads(row["error"]) if row["error"] else None,
                   result=json.loads(row["result"]) if row["result"] else None, notes=json.loads(row["notes"]),
                   attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]))


class ResultStore:
    """Where a job's files live: one folder each, on local or shared storage.

    Kept to a few methods so that an object store can stand in later. Results are staged in
    `scratch` (this process's scratch folder, `autocontour.server.scratch`; on the same filesystem, so that
    publishing is a rename), where a job interrupted by a crash leaves nothing that is not swept.
    """

    def __init__(self, root: Path, scratch: Path | None = None):
        self.root = Path(root)
        self.scratch = Path(scratch) if scratch else self.root / "tmp"
        (self.root / "uploads").mkdir(parents=True, exist_ok=True)
        (self.root / "results").mkdir(parents=True, exist_ok=True)

    def upload_path(self, job_id: str, name: str) -> Path:
        return self.root / "uploads" / job_id / name

    def result_dir(self, job_id: str) -> Path:
        return self.root / "results" / job_id

    def zip_path(self, job_id: str) -> Path:
        return self.result_dir(job_id) / "result.zip"

    def source_dir(self, job_id: str) -> Path:
        """Where a finished DICOM job keeps its input series (deleted with the job; not in the zip)."""
        return self.result_dir(job_id) / SOURCE

    def publish(self, job_id: str, staging: Path) -> None:
        """Make a finished result visible in one step (a rename), replacing any earlier attempt."""
        target = self.result_dir(job_id)
        shutil.rmtree(target, ignore_errors=True)
        _zip_top_level(staging)
        staging.rename(target)

    def rezip(self, job_id: str) -> None:
        """Rebuild a result's zip from its top-level files (after approval), replacing the old one in one step."""
        _zip_top_level(self.result_dir(job_id))

    def staging_dir(self, job_id: str) -> Path:
        path = self.scratch / f"staging-{job_id}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def delete_upload(self, job_id: str) -> None:
        shutil.rmtree(self.root / "uploads" / job_id, ignore_errors=True)

    def delete(self, job_id: str) -> None:
        self.delete_upload(job_id)
        shutil.rmtree(self.result_dir(job_id), ignore_errors=True)

    def sweep_uploads(self, keep: Callable[[str], bool]) -> int:
        """Remove the uploads of jobs that `keep` says are gone or finished (left by a crash)."""
        removed = 0
        for folder in (self.root / "uploads").iterdir():
            if not keep(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    def writable(self) -> bool:
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False


def _zip_top_level(folder: Path) -> None:
    """result.zip of the folder's top-level files (not review/, versions/ or source/)."""
    staging = folder / f"result.zip.{uuid.uuid4().hex[:8]}.tmp"
    with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(("result.zip", ".")):
                archive.write(path, path.name)
    staging.replace(folder / "result.zip")


class JobStore:
    """The jobs table. Thread-safe; every method is one short transaction."""

    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _exec(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def create(self, options: dict, owner: str | None, input_name: str, job_id: str | None = None,
               max_queued: int | None = None) -> Job:
        """Record a queued job. With `max_queued`, refuse it (QueueFull) when that many jobs wait already:
        the count and the insert are one statement, so concurrent uploads cannot overfill the queue."""
        job = Job(id=job_id or uuid.uuid4().hex, owner=owner, status="queued", created=time.time(),
                  options=options, input_name=input_name)
        values = (job.id, owner, job.status, job.created, json.dumps(options), input_name)
        if max_queued is None:
            self._exec("INSERT INTO jobs (id, owner, status, created, options, input_name) VALUES (?, ?, ?, ?, ?, ?)",
                       values)
        elif not self._exec("INSERT INTO jobs (id, owner, status, created, options, input_name) "
                            "SELECT ?, ?, ?, ?, ?, ? WHERE (SELECT COUNT(*) FROM jobs WHERE status = 'queued') < ?",
                            (*values, max_queued)):
            raise QueueFull(f"{max_queued} jobs are waiting")
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return Job.from_row(row) if row else None

    def list(self, owner: str | None, limit: int) -> list[Job]:
        with self._lock:
            if owner is None:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY created DESC LIMIT ?",
                                        (owner, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def unfinished(self) -> builtins.list[Job]:
        """Jobs not yet done, failed or cancelled, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created"
                                    ).fetchall()
        return [Job.from_row(r) for r in rows]

    def _count(self, sql: str, args: tuple = ()) -> int:
        row = self._one(sql, args)
        assert row is not None  # COUNT(*) always returns one row
        return int(row[0])

    def queue_depth(self) -> int:
        return self._count("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")

    def count(self, status: str) -> int:
        return self._count("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,))

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to running."""
        with self._lock:
            row = self._db.execute(
                "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1 WHERE id = "
                "(SELECT id FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1) RETURNING *",
                (time.time(),)).fetchone()
        return Job.from_row(row) if row else None

    def mark_running(self, job_id: str) -> None:
        """A job an external worker has started (Celery mode)."""
        self._exec("UPDATE jobs SET status = 'running', started = COALESCE(started, ?) "
                   "WHERE id = ? AND status = 'queued'",
                   (time.time(), job_id))

    def set_progress(self, job_id: str, progress: dict) -> None:
        self._exec("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))

    def finish(self, job_id: str, result: dict, started: float | None = None, finished: float | None = None) -> bool:
        """Returns whether this call finished the job (False: it was final already).

        `started` and `finished` are when the job ran (a worker's clock), for a job recorded later than it
        ran (the API was down); without them: as recorded, else now."""
        return self._final(job_id, "done", "result", result, started, finished, unknown_start=time.time())

    def fail(self, job_id: str, error: dict, started: float | None = None, finished: float | None = None) -> bool:
        return self._final(job_id, "failed", "error", error, started, finished)

    def _final(self, job_id: str, status: str, column: str, value: dict | None, started: float | None,
               finished: float | None, unknown_start: float | None = None) -> bool:
        """The start is the worker's (`started`), else as recorded, else `unknown_start`."""
        return bool(self._exec(f"UPDATE jobs SET status = ?, finished = ?, {column} = ?, "  # noqa: S608 - fixed names
                               "started = COALESCE(?, started, ?) WHERE id = ? AND status IN ('queued', 'running')",
                               (status, finished or time.time(), json.dumps(value), started, unknown_start, job_id)))

    def set_result(self, job_id: str, result: dict) -> None:
        """A finished job's result record, updated after the job (its approval, the files it now holds)."""
        self._exec("UPDATE jobs SET result = ? WHERE id = ? AND status = 'done'", (json.dumps(result), job_id))

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, ask a running one to stop; returns the status after."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                             (time.time(), job_id))
            self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
            row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["status"] if row else None

    def mark_cancelled(self, job_id: str, started: float | None = None, finished: float | None = None) -> bool:
        return bool(self._exec("UPDATE jobs SET status = 'cancelled', finished = ?, started = COALESCE(?, started) "
                               "WHERE id = ? AND status IN ('queued', 'running')",
                               (finished or time.time(), started, job_id)))

    def requeue(self, job_id: str, progress: dict, note: str) -> bool:
        """A running job whose worker died goes back to waiting (Celery: redelivered to another worker)."""
        changed = bool(self._exec("UPDATE jobs SET status = 'queued', progress = ? WHERE id = ? AND status = 'running'",
                                  (json.dumps(progress), job_id)))
        if changed:
            self.add_note(job_id, note)
        return changed

    def cancel_requested(self, job_id: str) -> bool:
        row = self._one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(row and row[0])

    def delete(self, job_id: str) -> None:
        self._exec("DELETE FROM jobs WHERE id = ?", (job_id,))

    def add_note(self, job_id: str, note: str) -> None:
        job = self.get(job_id)
        if job:
            self._exec("UPDATE jobs SET notes = ? WHERE id = ?", (json.dumps(job.notes + [note]), job_id))

    def recover(self, max_attempts: int) -> builtins.list[str]:
        """After a restart: requeue jobs that were running, or fail them after `max_attempts` starts."""
        with self._lock:
            rows = self._db.execute("SELECT id, attempts, options FROM jobs WHERE status = 'running'").fetchall()
        recovered = []
        for row in rows:
            if row["attempts"] >= max_attempts:
                self.fail(row["id"], problem_body(
                    500, "interrupted", "Interrupted too often",
                    f"the server stopped during this job {row['attempts']} times",
                    request_id=job_request_id(row["id"], json.loads(row["options"]))))
            else:
                self._exec("UPDATE jobs SET status = 'queued', progress = '{}' WHERE id = ?", (row["id"],))
                self.add_note(row["id"], "requeued: the server restarted while this job was running")
            recovered.append(row["id"])
        return recovered

    def expired(self, ttl_s: float) -> builtins.list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status IN ('done', 'failed', 'cancelled') "
                                    "AND finished < ?", (time.time() - ttl_s,)).fetchall()
        return [r["id"] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
