"""A real Orthanc PACS (Debian packages orthanc + orthanc-dicomweb) on loopback, for tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import generate_uid
from servers import free_port

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class Orthanc:
    url: str
    process: subprocess.Popen
    folder: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_orthanc() -> Orthanc:
    """Orthanc with a throwaway storage, HTTP on loopback only, its DICOM port off, as an unprivileged user.

    Its folder is made directly under the system temp dir, so that the unprivileged
    user can reach it (pytest's own temp folders are private to the test user).
    """
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    folder = Path(tempfile.mkdtemp(prefix="autocontour-orthanc-"))
    port = free_port()
    config = {
        "Name": "autocontour-test", "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"), "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"}, "StableAge": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    command = [binary, str(folder / "orthanc.json")]
    if os.geteuid() == 0:  # never run a network service as root in tests
        os.chmod(folder, 0o777)
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
    process = subprocess.Popen(command, stdout=open(folder / "orthanc.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((folder / "orthanc.log").read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                return Orthanc(url, process, folder)
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("Orthanc did not start")


def pacs_copy(series_folder: Path, target: Path) -> str:
    """A copy of a series with study, series and SOP UIDs of its own, so that a test's study is not the shipped
    example's (which other tests may store in the same PACS) nor another copy's.

    Returns the study UID. UIDs are deterministic (derived from the file names).
    """
    target.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(entropy_srcs=["example-study"]), generate_uid(entropy_srcs=["example-series"])
    for path in sorted(series_folder.glob("CT*")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[path.name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.save_as(str(target / path.name), enforce_file_format=True)
    return study


def upload_folder(orthanc: Orthanc, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        response = httpx.post(f"{orthanc.url}/instances", content=path.read_bytes())
        response.raise_for_status()
