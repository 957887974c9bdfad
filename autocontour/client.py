"""A small client for planning scripts: submit a CT, wait, download the draft contours.

    from autocontour.client import Client
    with Client("http://autocontour:8000", api_key="...") as client:
        job = client.submit("ct.nii.gz", structures="bladder,ctvn")
        job = client.wait(job["id"], progress=print)
        client.download(job["id"], "out/")

Retries: connection errors and 502/503/504 are retried with exponential
back-off, honouring Retry-After (a full queue answers 503 + Retry-After).
Problem documents from the server raise `ServerError` with their detail.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx

RETRY_STATUSES = (502, 503, 504)


class ServerError(Exception):
    """The server refused or failed a request; `problem` is its RFC 9457 document."""

    def __init__(self, status: int, problem: dict):
        self.status, self.problem = status, problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip())


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0, retries: int = 5,
                 backoff_s: float = 1.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries, self.backoff_s = retries, backoff_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                for value in kwargs.get("files", {}).values():  # rewind uploads before a retry
                    value[1].seek(0)
                response = self.http.request(method, url, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2 ** attempt)
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                retry_after = response.headers.get("retry-after", "")
                time.sleep(float(retry_after) if retry_after.isdigit() else self.backoff_s * 2 ** attempt)
                continue
            if response.status_code >= 400:
                try:
                    problem = response.json()
                except ValueError:
                    problem = {"detail": response.text[:200]}
                raise ServerError(response.status_code, problem)
            return response
        raise AssertionError("unreachable")

    def structures(self) -> dict:
        return self._request("GET", "/v1/structures").json()

    def model(self) -> dict:
        return self._request("GET", "/v1/model").json()

    def submit(self, ct: Path | str, structures: str | None = None, support_size: int | None = None,
               ensemble: int | None = None, threshold: float | None = None, probabilities: bool = False,
               axial_search: str | None = None) -> dict:
        """Upload a CT; returns the queued job. `axial_search="all"` searches every body slice."""
        data = {k: str(v) for k, v in {"structures": structures, "support_size": support_size, "ensemble": ensemble,
                                       "threshold": threshold, "axial_search": axial_search}.items() if v is not None}
        data["probabilities"] = str(probabilities).lower()
        with open(ct, "rb") as f:
            return self._request("POST", "/v1/segmentations", files={"file": ("ct.nii.gz", f)}, data=data).json()

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/segmentations/{job_id}").json()

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float = 3600.0,
             progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is done, failed or cancelled; returns the final job."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if progress:
                progress(job)
            if job["status"] in ("done", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def download(self, job_id: str, out_dir: Path | str) -> list[Path]:
        """Unpack the result zip into out_dir; returns the files."""
        content = self._request("GET", f"/v1/segmentations/{job_id}/result").content
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = [n for n in archive.namelist() if "/" not in n and ".." not in n]
            for name in names:
                (out / name).write_bytes(archive.read(name))
        return [out / n for n in names]

    def cancel(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/segmentations/{job_id}")
