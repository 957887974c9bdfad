"""The HTTP service end to end: a real uvicorn process on loopback, the example CT, real HTTP."""

from __future__ import annotations

import concurrent.futures
import io
import json
import signal
import time
import zipfile

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
from badinputs import bad_inputs
from conftest import EXAMPLE_CT
from servers import start_server

from app.cli import main
from app.client import Client, ServerError
from app.server.auth import hash_key

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
    assert f"[lifecycle-42] app.server.worker: job {job['id']} done" in server.logs()  # the worker logs the id too
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
