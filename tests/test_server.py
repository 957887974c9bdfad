"""The HTTP service end to end: a real uvicorn process on loopback, the example CT, real HTTP."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import signal
import threading
import time
import warnings
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
from badinputs import bad_inputs
from conftest import DATA, EXAMPLE_CT
from servers import free_port, start_server

from autocontour.cli import main
from autocontour.client import Client, ServerError
from autocontour.phantom import make_phantom
from autocontour.pipeline.library import Library
from autocontour.server.auth import hash_key
from autocontour.server.main import create_app
from autocontour.server.settings import ServerSettings

PROBLEM = "application/problem+json"


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def upload(url: str, path, data: dict | None = None, name: str = "ct.nii.gz", **kwargs) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{url}/v1/segmentations", files={"file": (name, f)}, data=data or {}, timeout=300, **kwargs)


def wait_done(url: str, job_id: str, timeout: float = 300, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/segmentations/{job_id}", headers=headers).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished")


def read_zip(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {n: archive.read(n) for n in archive.namelist()}


def image_from(data: bytes, tmp_path, name: str) -> sitk.Image:
    path = tmp_path / name
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


@contextlib.contextmanager
def in_process(tmp_path, weights, **settings):
    """The app in this process, for tests that look inside it or hold it at a chosen point.

    No network is loaded (the model card and support sets only), so no worker runs and accepted jobs stay
    queued.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Using `httpx` with")  # starlette would rather have httpx2; httpx works
        from fastapi.testclient import TestClient

    config = ServerSettings(data_dir=tmp_path / "data", weights=weights, device="cpu", warmup=False, **settings)
    app = create_app(config, Library(config))
    logger = logging.getLogger("autocontour")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, app
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved  # the lifespan configured logging


def small_ct(folder: Path) -> Path:
    """A valid CT of 48 x 40 x 16 = 30,720 voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small_ct.nii.gz"
    sitk.WriteImage(make_phantom(5, size=(48, 40, 16), spacing=(8.0, 8.0, 6.0)).ct, str(path), useCompression=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_weights):
    s = start_server(tmp_path_factory.mktemp("server"), small_weights, max_upload_bytes=20_000_000)
    yield s
    s.stop()
    assert "ct.nii.gz" not in s.logs() and "patient" not in s.logs()  # no file names in the logs


def test_health_catalogue_model_and_metrics(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and all(ready["checks"].values())
    assert ready["checks"]["model_loaded"] and ready["model"] == "loaded in this process (cpu)"
    catalogue = {s["name"]: s for s in httpx.get(f"{server.url}/v1/structures").json()["structures"]}
    assert catalogue["bladder"]["support_set"]["id"].startswith("bladder-")
    assert catalogue["ctvp"]["support_set"] is None and "support build ctvp" in catalogue["ctvp"]["how_to_add"]
    model = httpx.get(f"{server.url}/v1/model").json()
    assert model["name"] == "test-small" and len(model["sha256"]) == 64 and model["device"] == "cpu"
    response = httpx.get(f"{server.url}/metrics")
    assert "autocontour_queue_depth" in response.text and "autocontour_http_requests_total" in response.text
    assert response.headers["x-request-id"]
    traced = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "trace-42"})
    assert traced.headers["x-request-id"] == "trace-42"
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/segmentations/{job_id}/masks/{structure}" in schema["paths"]
    assert "draft" in schema["info"]["description"].lower()


def test_wait_returns_the_zip_with_masks_on_the_ct_grid(server, tmp_path):
    response = upload(server.url, EXAMPLE_CT, {"structures": "bladder,ctvn", "probabilities": "true"},
                      name="patient_john_doe.nii.gz", params={"wait": "true"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert response.headers["location"].startswith("/v1/segmentations/")
    files = read_zip(response.content)
    assert set(files) == {"bladder.nii.gz", "ctvn.nii.gz", "bladder_prob.nii.gz", "ctvn_prob.nii.gz",
                          "summary.json", "preview.png"}
    ct = sitk.ReadImage(str(EXAMPLE_CT))
    for name in ("bladder.nii.gz", "ctvn_prob.nii.gz"):
        assert same_grid(image_from(files[name], tmp_path, name), ct)
    summary = json.loads(files["summary.json"])
    assert "draft" in summary["disclaimer"].lower() and set(summary["structures"]) == {"bladder", "ctvn"}
    assert "john" not in files["summary.json"].decode()


def test_async_job_lifecycle(server, tmp_path):
    response = upload(server.url, EXAMPLE_CT, {"structures": "bladder,anorectum,ctvn"},
                      headers={"X-Request-ID": "lifecycle-42"})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/segmentations/{job['id']}"
    assert job["status"] in ("queued", "running") and "draft" in job["disclaimer"].lower()
    seen_progress = False
    for _ in range(1000):
        job = httpx.get(f"{server.url}{response.headers['location']}").json()
        seen_progress |= bool(job["progress"].get("slices_total"))
        if job["status"] == "done":
            break
        time.sleep(0.1)
    assert job["status"] == "done" and job["started"] and job["finished"]
    assert seen_progress or job["progress"]["slices_done"] == job["progress"]["slices_total"]
    assert set(job["progress"]["structures"]) <= {"bladder", "anorectum", "ctvn"}
    assert job["progress"]["phase"] == "writing outputs"  # every stage is named, the last one too
    assert set(job["result"]["structures"]) == {"bladder", "anorectum", "ctvn"}
    assert job["result"]["timings_s"]["total"] > 0 and job["result"]["model"]["name"] == "test-small"
    base = f"{server.url}/v1/segmentations/{job['id']}"
    files = read_zip(httpx.get(f"{base}/result").content)
    assert {"bladder.nii.gz", "anorectum.nii.gz", "ctvn.nii.gz", "summary.json", "preview.png"} == set(files)
    mask = httpx.get(f"{base}/masks/bladder")
    assert mask.status_code == 200 and mask.content == files["bladder.nii.gz"]
    assert same_grid(image_from(mask.content, tmp_path, "m.nii.gz"), sitk.ReadImage(str(EXAMPLE_CT)))
    assert httpx.get(f"{base}/summary").json()["structures"]["ctvn"]["support_set"]["id"].startswith("ctvn-")
    assert httpx.get(f"{base}/preview").content[:4] == b"\x89PNG"
    missing = httpx.get(f"{base}/masks/ctvp")
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert any(j["id"] == job["id"] for j in httpx.get(f"{server.url}/v1/segmentations").json())
    assert f"[lifecycle-42] autocontour.server.worker: job {job['id']} done" in server.logs()  # worker logs it
    assert "request_id" not in job["options"]
    assert httpx.delete(base).status_code == 204
    gone = httpx.get(base)
    assert gone.status_code == 404 and gone.json()["type"].endswith("not-found")


def test_bad_inputs_get_named_4xx_and_the_server_stays_healthy(server, tmp_path):
    corpus = bad_inputs(tmp_path / "bad")
    for name, (path, words) in corpus.items():
        response = upload(server.url, path)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert response.headers["content-type"] == PROBLEM, name
        body = response.json()
        assert words.lower() in body["detail"].lower() or name == "wrong extension", (name, body)
        assert body["status"] == response.status_code and body["type"].startswith("urn:autocontour:problem:")
    cases = [
        ({"structures": "liver"}, "liver"),
        ({"structures": "ctvp"}, "support build ctvp"),
        ({"support_size": "0"}, "support_size"),
        ({"threshold": "1.5"}, "threshold"),
        ({"ensemble": "many"}, "ensemble"),
        ({"probabilities": "perhaps"}, "probabilities"),
    ]
    for data, words in cases:
        response = upload(server.url, EXAMPLE_CT, data)
        assert response.status_code == 422 and words in response.json()["detail"], (data, response.text)
    no_file = httpx.post(f"{server.url}/v1/segmentations", data={"structures": "bladder"})
    assert no_file.status_code == 422 and "file" in no_file.json()["detail"]
    too_big = httpx.post(f"{server.url}/v1/segmentations", files={"file": ("x.nii.gz", b"\0" * 25_000_000)})
    assert too_big.status_code == 413 and too_big.headers["content-type"] == PROBLEM
    assert httpx.get(f"{server.url}/v1/segmentations/nope").status_code == 404
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    ok = upload(server.url, EXAMPLE_CT, {"structures": "bladder"}, params={"wait": "true"})
    assert ok.status_code == 200


def test_eight_concurrent_uploads_all_finish_correctly(server):
    reference = read_zip(upload(server.url, EXAMPLE_CT, {"structures": "bladder"}, params={"wait": "true"}).content)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        submitted = list(pool.map(lambda _: upload(server.url, EXAMPLE_CT, {"structures": "bladder"}), range(8)))
    assert all(r.status_code == 202 for r in submitted)
    ids = [r.json()["id"] for r in submitted]
    assert len(set(ids)) == 8
    for job_id in ids:
        job = wait_done(server.url, job_id)
        assert job["status"] == "done"
        files = read_zip(httpx.get(f"{server.url}/v1/segmentations/{job_id}/result").content)
        assert files["bladder.nii.gz"] == reference["bladder.nii.gz"]  # deterministic: the same CT, the same mask


def test_cancel_a_queued_job(server):
    first = upload(server.url, EXAMPLE_CT).json()
    second = upload(server.url, EXAMPLE_CT).json()
    response = httpx.delete(f"{server.url}/v1/segmentations/{second['id']}")
    assert response.status_code == 202
    assert wait_done(server.url, second["id"])["status"] == "cancelled"
    assert wait_done(server.url, first["id"])["status"] == "done"
    result = httpx.get(f"{server.url}/v1/segmentations/{second['id']}/result")
    assert result.status_code == 409


def test_evaluations_endpoint(server):
    from conftest import DATA

    case = DATA / "metrics" / "b_shift_x_1vox"
    with open(case / "pred.nii.gz", "rb") as p, open(case / "ref.nii.gz", "rb") as r:
        response = httpx.post(f"{server.url}/v1/evaluations", files={"prediction": p, "reference": r},
                              data={"structure": "blob", "tolerance_mm": "1,2"})
    assert response.status_code == 200
    (record,) = response.json()["records"]
    assert record["structure"] == "blob" and record["metrics"]["hd100_mm"] == pytest.approx(0.9, abs=1e-4)
    assert "nsd_2mm" in record["metrics"] and "nsd_3mm" not in record["metrics"]
    bad = httpx.post(f"{server.url}/v1/evaluations", files={"prediction": b"junk", "reference": b"junk"})
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM


def test_client_and_submit_command(server, tmp_path, capsys):
    with Client(server.url) as client:
        assert client.model()["name"] == "test-small"
        job = client.submit(EXAMPLE_CT, structures="bladder")
        seen = []
        job = client.wait(job["id"], poll_s=0.2, progress=seen.append)
        assert job["status"] == "done" and seen
        files = client.download(job["id"], tmp_path / "client")
        assert {f.name for f in files} >= {"bladder.nii.gz", "summary.json"}
        with pytest.raises(ServerError) as err:
            client.submit(EXAMPLE_CT, structures="liver")
        assert err.value.status == 422 and "liver" in str(err.value)
    code = main(["submit", str(EXAMPLE_CT), "--server", server.url, "--out", str(tmp_path / "cli"),
                 "--structures", "anorectum", "--quiet"])
    assert code == 0 and (tmp_path / "cli" / "anorectum.nii.gz").is_file()
    assert "DRAFT" in capsys.readouterr().out
    code = main(["submit", str(EXAMPLE_CT), "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2


def test_queue_full_answers_503_with_retry_after(tmp_path, small_weights):
    s = start_server(tmp_path / "data", small_weights, max_queue=1, retry_after_s=7)
    try:
        responses = [upload(s.url, EXAMPLE_CT) for _ in range(4)]
        codes = [r.status_code for r in responses]
        assert 503 in codes and codes[0] == 202
        refused = responses[codes.index(503)]
        assert refused.headers["retry-after"] == "7" and refused.headers["content-type"] == PROBLEM
        for r in responses:
            if r.status_code == 202:
                assert wait_done(s.url, r.json()["id"])["status"] == "done"
    finally:
        s.stop()


def test_api_keys(tmp_path, small_weights):
    keys = {"planner": {"sha256": hash_key("secret-planner"), "scopes": ["segment", "read"]},
            "viewer": {"sha256": hash_key("secret-viewer"), "scopes": ["read"]}}
    s = start_server(tmp_path / "data", small_weights, api_keys=keys)
    try:
        assert upload(s.url, EXAMPLE_CT).status_code == 401
        assert httpx.get(f"{s.url}/v1/model").status_code == 401
        wrong = upload(s.url, EXAMPLE_CT, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        viewer = {"X-API-Key": "secret-viewer"}
        assert upload(s.url, EXAMPLE_CT, headers=viewer).status_code == 403
        planner = {"Authorization": "Bearer secret-planner"}
        response = upload(s.url, EXAMPLE_CT, {"structures": "bladder"}, headers=planner)
        assert response.status_code == 202
        job = wait_done(s.url, response.json()["id"], headers=planner)
        assert job["status"] == "done"
        assert httpx.get(f"{s.url}/v1/segmentations/{job['id']}", headers=viewer).status_code == 404  # not theirs
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # probes need no key
        assert "secret" not in s.logs()
    finally:
        s.stop()


def test_restart_keeps_results_and_finishes_accepted_jobs(tmp_path, small_weights):
    data = tmp_path / "data"
    s = start_server(data, small_weights)
    done = upload(s.url, EXAMPLE_CT, {"structures": "bladder"}, params={"wait": "true"})
    done_id = done.headers["x-job-id"]
    accepted = [upload(s.url, EXAMPLE_CT).json()["id"] for _ in range(3)]
    deadline = time.monotonic() + 60
    while httpx.get(f"{s.url}/v1/segmentations/{accepted[0]}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s.stop(signal.SIGKILL)  # a crash, mid-job
    s = start_server(data, small_weights)
    try:
        again = httpx.get(f"{s.url}/v1/segmentations/{done_id}/result")
        assert again.status_code == 200
        assert read_zip(again.content)["bladder.nii.gz"] == read_zip(done.content)["bladder.nii.gz"]
        for job_id in accepted:
            job = wait_done(s.url, job_id)
            assert job["status"] == "done", job
        assert any("restarted" in n for n in httpx.get(f"{s.url}/v1/segmentations/{accepted[0]}").json()["notes"])
    finally:
        s.stop()


def test_openapi_matches_the_problem_documents(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components and "ValidationError" not in components
    assert set(components["Problem"]["required"]) >= {"type", "title", "status", "detail"}
    assert components["Problem"]["properties"]["detail"]["type"] == "string"

    def errors(path: str, method: str) -> dict:
        responses = schema["paths"][path][method]["responses"]
        found = {}
        for code, response in responses.items():
            if int(code) >= 400:
                assert set(response["content"]) == {PROBLEM}, (path, method, code)
                assert response["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
                found[int(code)] = response
        return found

    submit = errors("/v1/segmentations", "post")
    assert {400, 401, 403, 409, 413, 422, 503} <= set(submit)
    assert "Retry-After" in submit[503]["headers"] and "WWW-Authenticate" in submit[401]["headers"]
    assert {401, 403, 404} <= set(errors("/v1/segmentations/{job_id}", "get"))
    assert {401, 403, 404, 409} <= set(errors("/v1/segmentations/{job_id}/result", "get"))
    assert {401, 403, 413, 422} <= set(errors("/v1/evaluations", "post"))
    assert {401, 403} <= set(errors("/v1/model", "get"))
    for path, item in schema["paths"].items():  # every documented error is a problem document
        for method in item:
            if path != "/readyz":
                errors(path, method)
    ready = schema["paths"]["/readyz"]["get"]["responses"]
    assert ready["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # and what is documented is what is sent
    refused = httpx.get(f"{server.url}/v1/segmentations", params={"limit": 0})
    assert refused.status_code == 422 and refused.headers["content-type"] == PROBLEM
    assert isinstance(refused.json()["detail"], str)
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")


def test_the_configured_voxel_limit_refuses_an_upload_before_inflating_it(tmp_path, small_weights, monkeypatch):
    import autocontour.io

    ct = small_ct(tmp_path / "in").read_bytes()
    dicom_zip = io.BytesIO()
    with zipfile.ZipFile(dicom_zip, "w") as archive:
        for path in (DATA / "dicom_ct").glob("CT.*"):
            archive.write(path, path.name)
    dicom_zip = dicom_zip.getvalue()
    scanned = []
    stream = autocontour.io._stream_data
    monkeypatch.setattr(autocontour.io, "_stream_data", lambda *a, **k: scanned.append(1) or stream(*a, **k))
    with in_process(tmp_path, small_weights, max_voxels=30_000) as (client, server_app):
        refused = client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)}, data={"structures": "bladder"})
        assert refused.status_code == 422 and refused.headers["content-type"] == PROBLEM
        body = refused.json()
        assert body["type"].endswith("invalid-image") and "30,720 voxels" in body["detail"]
        assert "limit of 30,000" in body["detail"]
        assert not scanned  # refused from the header: no voxel was inflated
        series = client.post("/v1/segmentations", files={"file": ("ct.zip", dicom_zip)}, data={"structures": "bladder"})
        assert series.status_code == 422 and series.headers["content-type"] == PROBLEM
        assert "5,242,880 voxels, more than the limit of 30,000" in series.json()["detail"]  # a DICOM series too
        assert server_app.state.jobs.list(None, 10) == []  # and no job was created
        assert not any((tmp_path / "data" / "uploads").iterdir())
        server_app.state.settings.max_voxels = 30_720  # the limit is the configured one, not the built-in one
        accepted = client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)}, data={"structures": "bladder"})
        assert accepted.status_code == 202 and scanned


def test_concurrent_uploads_never_overfill_the_queue(tmp_path, small_weights, monkeypatch):
    """All uploads pass the early check together (the queue is empty), then are recorded together."""
    from autocontour.server.routers import segmentations

    uploads = 5
    ct = small_ct(tmp_path / "in").read_bytes()
    together = threading.Barrier(uploads, timeout=60)
    validate = segmentations.read_input

    def validate_then_wait(*args):
        validate(*args)
        together.wait()

    monkeypatch.setattr(segmentations, "read_input", validate_then_wait)
    with in_process(tmp_path, small_weights, max_queue=2, retry_after_s=9, max_concurrent_decodes=uploads) as (
            client, server_app):
        with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
            responses = list(pool.map(lambda _: client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)},
                                                            data={"structures": "bladder"}), range(uploads)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [202, 202, 503, 503, 503], [r.text for r in responses]
        for refused in (r for r in responses if r.status_code == 503):
            assert refused.headers["retry-after"] == "9" and refused.headers["content-type"] == PROBLEM
            assert refused.json()["type"].endswith("queue-full")
        accepted = {r.json()["id"] for r in responses if r.status_code == 202}
        assert server_app.state.jobs.queue_depth() == 2
        assert {p.name for p in (tmp_path / "data" / "uploads").iterdir()} == accepted  # refused uploads removed


def test_celery_mode_readiness_says_what_it_checks(tmp_path, small_weights):
    broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with in_process(tmp_path, small_weights, queue="celery", broker_url=broker) as (client, _):
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not ready"
        assert ready.json()["model"] == "card loaded; network runs in workers"  # no network in this process
        assert ready.json()["checks"] == {"model_card_loaded": True, "broker_reachable": False,
                                          "worker_running": False, "storage_writable": True}


def test_celery_mode_with_the_broker_down_refuses_with_503_and_records_nothing(tmp_path, small_weights):
    broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with in_process(tmp_path, small_weights, queue="celery", broker_url=broker) as (client, server_app):
        ct = small_ct(tmp_path).read_bytes()
        started = time.monotonic()
        response = client.post("/v1/segmentations", files={"file": ("ct.nii.gz", ct)})
        assert response.status_code == 503 and time.monotonic() - started < 60  # refused, not hung
        assert response.headers["content-type"] == "application/problem+json" and "Retry-After" in response.headers
        assert response.json()["type"].endswith("queue-unavailable") and "broker" in response.json()["detail"]
        assert server_app.state.jobs.list(None, 10) == []  # no job left "queued" forever
        assert not any((tmp_path / "data").rglob("ct.nii.gz"))  # nor its upload


def test_celery_mode_job_list_is_up_to_date_without_polling_each_job(tmp_path, small_weights, monkeypatch):
    from test_jobs import FakeTask

    from autocontour.server import celery_queue
    from autocontour.server.worker import Outcome

    broker = f"redis://127.0.0.1:{free_port()}/0"
    with in_process(tmp_path, small_weights, queue="celery", broker_url=broker) as (client, server_app):
        monkeypatch.setattr(celery_queue, "AsyncResult", FakeTask)
        store = server_app.state.jobs
        done, running, waiting = (store.create({"structures": ["bladder"]}, None, "ct.nii.gz") for _ in range(3))
        monkeypatch.setattr(FakeTask, "states", {
            done.id: ("SUCCESS", Outcome("done", result={"files": {}}).to_dict()),
            running.id: ("PROGRESS", {"progress": {"slices_done": 3, "slices_total": 9, "worker": "w1"}})})
        listed = {j["id"]: j for j in client.get("/v1/segmentations").json()}  # no job was fetched on its own
        assert listed[done.id]["status"] == "done" and listed[done.id]["links"]["result"]
        assert listed[running.id]["status"] == "running" and listed[running.id]["progress"]["slices_done"] == 3
        assert listed[waiting.id]["status"] == "queued"
