"""What an outside probe found (issue 16), each through a real server on loopback.

1. no 500 for any number a client sends, and an unhandled error is a counted problem document;
2. geometry the readers would repair is refused from the header (tests/badinputs.py, through the server);
3. no patient data left behind by a kill -9, in the system's temporary folder or in staging folders;
4. an upload costs what the limits say: decoded bytes, compression ratio, concurrent decodes;
5. 413 for chunked bodies, empty structures, Allow headers, the schema;
and a bounded soak of mixed requests while jobs run, and schemathesis against the live schema; from the second
probe (issue 34): a keyless or read-only upload is refused before its body is read.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from badinputs import bad_inputs
from conftest import DATA, EXAMPLE_CT
from servers import start_server
from test_server import PROBLEM, in_process, small_ct, upload, wait_done

from autocontour.server.auth import hash_key

ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS_S = 60
FUZZER_KEY = "fuzzer-key"


def dicom_zip() -> bytes:
    """The 20-slice DICOM CT of tests/data as one zip upload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((DATA / "dicom_ct").glob("CT.*")):
            archive.write(path, path.name)
    return buffer.getvalue()


def _cli_segment(zip_path: Path, out: Path, weights: Path, environment: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autocontour.cli", "segment", str(zip_path), "--out", str(out),
                             "--weights", str(weights), "--support-size", "2", "--structures", "bladder",
                             "--axial-search", "all", "--quiet"], env=environment, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _extracted_slices(folder: Path, process: subprocess.Popen) -> list[Path]:
    deadline = time.monotonic() + 120
    while not (found := list(folder.rglob("*.dcm"))):
        assert time.monotonic() < deadline and process.poll() is None, "no slice was extracted"
        time.sleep(0.02)
    return found


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_the_cli_leaves_no_extracted_patient_data_behind(tmp_path, small_weights, stop):
    """SIGTERM: the CLI removes its scratch folder on the way out; SIGKILL: the next run sweeps it."""
    system_tmp = tmp_path / "systemtmp"
    system_tmp.mkdir()
    zip_path = tmp_path / "ct.zip"
    zip_path.write_bytes(dicom_zip())
    environment = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCONTOUR_")} | {
        "TMPDIR": str(system_tmp)}
    process = _cli_segment(zip_path, tmp_path / "out", small_weights, environment)
    extracted = _extracted_slices(system_tmp, process)
    assert all("autocontour-cli" in p.parts for p in extracted)  # under the folder the CLI owns
    process.send_signal(stop)
    process.wait(timeout=60)
    if stop == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM
        assert not any(p.exists() for p in extracted)
    else:
        assert any(p.exists() for p in extracted)  # nothing could run on kill -9 ...
        again = _cli_segment(zip_path, tmp_path / "out2", small_weights, environment)
        assert again.wait(timeout=600) == 0
        assert not any(p.exists() for p in extracted)  # ... the next run swept it
    assert not [p for p in system_tmp.rglob("*") if p.is_file() and p.name != ".owner.lock"]


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def resident_memory(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_weights):
    s = start_server(tmp_path_factory.mktemp("hardening"), small_weights, max_upload_bytes=20_000_000)
    yield s
    s.stop()


def test_numbers_are_finite_and_unhandled_errors_are_counted_problems(server, tmp_path, small_weights):
    case = DATA / "metrics" / "b_shift_x_1vox"
    for tolerance in ("nan", "inf", "-inf", "1e309", "2,nan", "0", "-1"):
        with open(case / "pred.nii.gz", "rb") as p, open(case / "ref.nii.gz", "rb") as r:
            response = httpx.post(f"{server.url}/v1/evaluations", files={"prediction": p, "reference": r},
                                  data={"tolerance_mm": tolerance})
        assert response.status_code == 422 and response.headers["content-type"] == PROBLEM, (tolerance, response.text)
        assert "finite" in response.json()["detail"]
    for field, value in (("threshold", "nan"), ("threshold", "inf"), ("support_size", "1e309")):
        response = upload(server.url, EXAMPLE_CT, {field: value})
        assert response.status_code == 422 and field in response.json()["detail"], (field, value, response.text)
    assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text

    # and should a bug remain: a problem document with the request id, counted, logged under that id
    with in_process(tmp_path, small_weights) as (client, app):
        app.state.library.describe_model = lambda: 1 / 0
        response = client.get("/v1/model", headers={"X-Request-ID": "bug-16"})
        assert response.status_code == 500 and response.headers["content-type"] == PROBLEM
        assert response.json()["request_id"] == "bug-16" and response.headers["x-request-id"] == "bug-16"
        assert response.json()["type"].endswith("internal-error") and "ZeroDivision" not in response.text
        assert 'autocontour_http_requests_total{method="GET",route="/v1/model",status="500"} 1.0' in \
            client.get("/metrics").text


def test_a_kill_during_a_dicom_job_leaves_no_patient_data_behind(tmp_path, small_weights):
    system_tmp = tmp_path / "systemtmp"
    system_tmp.mkdir()
    data = tmp_path / "data"
    environment = {"TMPDIR": str(system_tmp)}
    s = start_server(data, small_weights, environment=environment)
    series = dicom_zip()
    response = httpx.post(f"{s.url}/v1/segmentations", files={"file": ("ct.zip", series)},
                          data={"structures": "bladder"}, timeout=120)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    extracted: list[Path] = []
    while not extracted:  # the slices are extracted (under the data folder) while the job runs
        assert time.monotonic() < deadline and s.process.poll() is None
        extracted = [p for p in (data / "tmp").rglob("*.dcm")]
        time.sleep(0.02)
    s.stop(signal.SIGKILL)
    assert not list(system_tmp.iterdir())  # never in the system's temporary folder
    dead_scratch = {p.parent.parent for p in extracted}
    s = start_server(data, small_weights, environment=environment)
    try:
        assert not any(p.exists() for p in dead_scratch)  # swept at start-up
        job = wait_done(s.url, job_id, timeout=300)
        assert job["status"] == "done" and any("restarted" in n for n in job["notes"])
        assert not list(system_tmp.iterdir())
        leftovers = [p for p in (data / "tmp").rglob("*") if p.is_file() and p.name != ".owner.lock"]
        assert leftovers == [], leftovers  # neither slices nor staging folders once the job ended
        assert not (data / "uploads" / job_id).exists()
        assert not [p for p in (data / "results").iterdir() if p.name.startswith(".")]
    finally:
        s.stop()
    assert not list((data / "tmp").iterdir())  # a clean stop removes its own scratch folder too


def nifti_claiming(tmp_path: Path, shape: tuple[int, int, int], datatype: int, bitpix: int) -> Path:
    """A .nii.gz under 1 MB whose header claims `shape` voxels of the given type (the data is 50 MiB of zeros)."""
    header = bytearray(gzip.decompress(small_ct(tmp_path / "ct").read_bytes())[:352])
    dims = np.frombuffer(bytes(header[40:56]), dtype="<i2").copy()
    dims[1:4] = shape
    header[40:56] = dims.tobytes()
    header[70:74] = np.array([datatype, bitpix], dtype="<i2").tobytes()
    path = tmp_path / f"claims-{'x'.join(map(str, shape))}-{datatype}.nii.gz"
    path.write_bytes(gzip.compress(bytes(header) + bytes(50 << 20), compresslevel=9))
    assert path.stat().st_size < 1 << 20
    return path


def test_an_upload_costs_what_the_limits_say(server, tmp_path, small_weights):
    before = peak_memory(server.process.pid)
    # the probe's file: 512 x 512 x 480 float64 (1 GB stored) in under 1 MB of gzip: 1,000 times its size
    refused = upload(server.url, nifti_claiming(tmp_path, (512, 512, 480), datatype=64, bitpix=64))
    assert refused.status_code == 422 and refused.headers["content-type"] == PROBLEM
    assert "limit of 500 times" in refused.json()["detail"], refused.text
    # 512 x 512 x 800 float64: more than the decoded-bytes limit (as float32: 8 bytes a voxel while decoding)
    refused = upload(server.url, nifti_claiming(tmp_path, (512, 512, 800), datatype=64, bitpix=64))
    assert "1,677,721,600 bytes of memory once decoded" in refused.json()["detail"], refused.text
    assert peak_memory(server.process.pid) - before < 64 << 20  # both refused from the header: nothing inflated

    # a zip of 256 MiB of zeros in a few hundred kB: refused before anything is extracted
    zip_bomb = io.BytesIO()
    with zipfile.ZipFile(zip_bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("CT.1", bytes(256 << 20))
    response = httpx.post(f"{server.url}/v1/segmentations", files={"file": ("ct.zip", zip_bomb.getvalue())},
                          timeout=120)
    assert response.status_code == 422 and "times its size" in response.json()["detail"], response.text

    # decoded bytes: voxels x (stored bytes + the larger of that and 4), from the header
    ct = small_ct(tmp_path / "in").read_bytes()  # 30,720 float32 voxels: 245,760 bytes decoded
    with in_process(tmp_path, small_weights, max_decoded_bytes=200_000, max_concurrent_decodes=1,
                    retry_after_s=1) as (client, app):
        response = client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)})
        assert response.status_code == 422 and "245,760 bytes of memory once decoded" in response.json()["detail"]
        assert "limit of 200,000" in response.json()["detail"]
        app.state.settings.max_decoded_bytes = 1 << 30
        assert app.state.decodes.acquire(timeout=1)  # the one decode slot is taken
        busy = client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and busy.json()["type"].endswith("busy")
        app.state.decodes.release()
        assert client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)}).status_code == 202


def test_sizes_fields_methods_and_schema_are_as_documented(server):
    def chunks():  # a well-formed multipart body of unknown length, streamed past the limit
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="ct.nii.gz"\r\n\r\n'
        for _ in range(21):
            yield b"\0" * 1_000_000

    chunked = httpx.post(f"{server.url}/v1/segmentations", content=chunks(),
                         headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=60)
    assert chunked.status_code == 413 and chunked.headers["content-type"] == PROBLEM
    assert "20,000,000 bytes" in chunked.json()["detail"]
    for empty in ("", "  ", " , "):
        response = upload(server.url, EXAMPLE_CT, {"structures": empty})
        assert response.status_code == 422 and "structure" in response.json()["detail"], (empty, response.text)
    for path, allowed in (("/v1/segmentations", "GET, POST"), ("/v1/segmentations/abc", "DELETE, GET"),
                          ("/v1/evaluations", "POST")):
        response = httpx.options(f"{server.url}{path}")
        assert response.status_code == 405 and response.headers["allow"] == allowed, (path, response.headers)
    schema = httpx.get(f"{server.url}/openapi.json").json()
    form = schema["paths"]["/v1/segmentations"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    body = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[-1]]
    assert "file" in body["required"] and "study_uid" not in body["properties"]  # no PACS on this server


def test_soak_mixed_requests_while_two_jobs_run(server, tmp_path):
    """Two rounds of 150 good and bad requests, four at a time, each while two jobs run: nothing lost, no 5xx,
    and the second round leaves memory where the first left it (the first sets up the thread pool and the
    allocator's per-thread arenas, which the process keeps)."""
    corpus = [path for path, _ in bad_inputs(tmp_path / "bad").values()]
    case = DATA / "metrics" / "b_shift_x_1vox"
    pick = random.Random(16)

    def one(i: int, jobs: list[str]) -> int:
        kind = i % 8
        if kind == 0:
            return upload(server.url, corpus[pick.randrange(len(corpus))]).status_code
        if kind == 1:
            return upload(server.url, EXAMPLE_CT, {"structures": pick.choice(["", " ", "liver", "bladder,liver"])}
                          ).status_code
        if kind == 2:
            with open(case / "pred.nii.gz", "rb") as p, open(case / "ref.nii.gz", "rb") as r:
                return httpx.post(f"{server.url}/v1/evaluations", files={"prediction": p, "reference": r},
                                  data={"tolerance_mm": pick.choice(["1,2", "nan", "1e999"])}, timeout=60).status_code
        paths = ["/v1/segmentations", f"/v1/segmentations/{jobs[i % 2]}", "/readyz", "/metrics",
                 f"/v1/segmentations/{jobs[0]}/result", "/v1/segmentations/nope", "/v1/structures"]
        return httpx.get(f"{server.url}{paths[i % len(paths)]}", timeout=60).status_code

    def soak_round() -> list[int]:
        jobs = [upload(server.url, EXAMPLE_CT, {"structures": "bladder,ctvn"}).json()["id"] for _ in range(2)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda i: one(i, jobs), range(150)))
        for job_id in jobs:  # nothing lost
            assert wait_done(server.url, job_id, timeout=300)["status"] == "done"
        return codes

    deadline = time.monotonic() + 400
    codes = soak_round()
    after_first = resident_memory(server.process.pid)
    codes += soak_round()
    assert time.monotonic() < deadline
    assert all(c < 500 for c in codes), sorted(set(codes))
    assert {200, 404, 422} <= set(codes)
    figures = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in figures and 'status="503"' not in figures
    grown = resident_memory(server.process.pid) - after_first
    print(f"soak: {len(codes)} requests and 4 jobs; resident memory {after_first / 2**20:.0f} MiB after the first "
          f"round, {grown / 2**20:+.0f} MiB after the second")
    assert grown < 0.15 * after_first  # allocator noise measured +13 to +73 MiB on about 1 GB; a leak grows per round


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, small_weights):
    keys = {"fuzzer": {"sha256": hash_key(FUZZER_KEY), "scopes": ["segment", "read", "evaluate"]}}
    s = start_server(tmp_path_factory.mktemp("keyed"), small_weights, max_upload_bytes=20_000_000, api_keys=keys)
    yield s
    s.stop()


def test_schemathesis_against_the_live_schema(keyed_server, tmp_path):
    """schemathesis (its standard checks, tests/schemathesis.toml) for a bounded time: no failure. The server
    requires keys and its schema says so, so schemathesis also sends requests without the key and checks that
    they are refused (its ignored_auth check)."""
    server = keyed_server
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    assert "security" in schema["paths"]["/v1/segmentations"]["post"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file",
               str(ROOT / "tests" / "schemathesis.toml"), "run", f"{server.url}/openapi.json",
               "--header", f"Authorization: Bearer {FUZZER_KEY}",
               "--max-time", str(SCHEMATHESIS_S), "--workers", "1", "--seed", "16"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=SCHEMATHESIS_S + 120,
                         cwd=tmp_path)  # its cache folder goes there, not into the repository
    summary = run.stdout[-3000:]
    print(summary)
    assert run.returncode == 0, summary
    assert "passed" in summary and 'status="500"' not in httpx.get(f"{server.url}/metrics").text
    assert json.loads(httpx.get(f"{server.url}/readyz").text)["status"] == "ready"


def _written(pid: int) -> int:
    """Bytes the process has passed to write() so far (files, sockets, logs): /proc/PID/io wchar."""
    return int(dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())["wchar"])


def _zeros_form(mebibytes: int, streamed: list[int]):
    """A multipart body of `mebibytes` MiB of zeros, streamed; counts in `streamed[0]` the bytes handed out."""
    yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="ct.nii.gz"\r\n\r\n'
    for _ in range(mebibytes):
        streamed[0] += 1 << 20
        yield bytes(1 << 20)


def test_keyless_and_read_only_uploads_are_refused_before_the_body_is_read(tmp_path, small_weights):
    """Issue 34, item 8: a 200 MiB multipart body streamed by a caller without a key (or with a wrong or
    read-only one) is answered 401/403 at once; the server closes the connection instead of reading on, and
    writes nothing of it (no temporary file of the form, no upload)."""
    keys = {"planner": {"sha256": hash_key(FUZZER_KEY), "scopes": ["segment", "read", "evaluate"]},
            "viewer": {"sha256": hash_key("viewer-key"), "scopes": ["read"]}}
    system_tmp = tmp_path / "systemtmp"
    system_tmp.mkdir()
    s = start_server(tmp_path / "data", small_weights, api_keys=keys, max_upload_bytes=1 << 30,
                     environment={"TMPDIR": str(system_tmp)})
    try:
        for route, headers, status in (("/v1/segmentations", {}, 401),
                                       ("/v1/segmentations", {"Authorization": "Bearer wrong"}, 401),
                                       ("/v1/segmentations", {"X-API-Key": "viewer-key"}, 403),
                                       ("/v1/evaluations", {"X-API-Key": "viewer-key"}, 403)):
            streamed = [0]
            written, started = _written(s.process.pid), time.monotonic()
            response = httpx.post(f"{s.url}{route}", content=_zeros_form(200, streamed), timeout=60,
                                  headers={"Content-Type": "multipart/form-data; boundary=x"} | headers)
            elapsed = time.monotonic() - started
            assert response.status_code == status and response.headers["content-type"] == PROBLEM, response.text
            assert response.headers["connection"] == "close"
            print(f"{route} {status}: answered after {streamed[0] >> 20} MiB of 200 were sent, in {elapsed:.2f} s")
            assert streamed[0] < 32 << 20 and elapsed < 5  # socket buffers take a few MiB before the answer
            assert _written(s.process.pid) - written < 64 << 10  # the answer and a log line, no body
            assert httpx.get(f"{s.url}/healthz").status_code == 200
        assert not list(system_tmp.rglob("*"))
        assert not (tmp_path / "data" / "uploads").exists() or not list((tmp_path / "data" / "uploads").iterdir())
        ok = upload(s.url, EXAMPLE_CT, {"structures": "bladder"}, headers={"Authorization": f"Bearer {FUZZER_KEY}"})
        assert ok.status_code == 202, ok.text  # a key with the scope still uploads
    finally:
        s.stop()


def test_an_open_server_declares_no_key(server):
    assert "securitySchemes" not in httpx.get(f"{server.url}/openapi.json").json()["components"]
