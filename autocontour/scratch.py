"""Temporary patient data under the data folder, one folder per process, swept when its process is gone.

An extracted DICOM zip holds every slice with the patient's name; a staging
folder holds a half-written result. Neither may outlive its job in a place
nobody cleans (the system's temporary folder). So each server or worker
process works in `DATA_DIR/tmp/<host>-<pid>-<random>/`, holding an exclusive
lock (flock) on a file inside it for as long as it lives. A process that
starts removes every other folder whose lock it can take: their owners died
(kill -9, a crash, a power cut), since the kernel drops a dead process's
locks. On a shared data folder this needs a filesystem with working flock
(local disks, NFSv4).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger(__name__)
LOCK = ".owner.lock"


class Scratch:
    """This process's scratch folder, locked while the process lives."""

    def __init__(self, data_dir: Path):
        root = Path(data_dir) / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        # made and locked under a hidden name, then renamed: a sweep never sees it unlocked
        claiming = root / f".claiming-{uuid.uuid4().hex}"
        claiming.mkdir()
        self._lock = open(claiming / LOCK, "w")  # noqa: SIM115 - held open for the process's lifetime
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        claiming.rename(self.path)

    def close(self) -> None:
        """At a clean shutdown: the folder goes now rather than at the next start."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def sweep(data_dir: Path) -> int:
    """Remove the scratch folders of processes that are gone; returns how many were removed."""
    root = Path(data_dir) / "tmp"
    removed = 0
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".claiming-") or not folder.is_dir():
            continue
        try:
            with open(folder / LOCK, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while the owner lives
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except BlockingIOError:
            continue
        except FileNotFoundError:  # removed meanwhile by another process's sweep
            continue
    if removed:
        log.info("removed %d scratch folder(s) left by processes that stopped", removed)
    return removed
