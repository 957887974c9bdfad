"""Editing a finished job over HTTP (issue 30): propagate a structure from drawn slices, correct a segmented one,
versions, approve; every bad edit refused with a problem naming it. A real server on loopback with API keys, the
example CT and the DICOM CT of tests/data, a small seeded network (its quality does not matter here, only the
contract: drawn slices come back exactly, nothing is overwritten, approval publishes what it names)."""

from __future__ import annotations

import io
import json
import signal
import tempfile
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DATA, EXAMPLE_CT, EXAMPLE_LABELS
from servers import start_server
from test_server import PROBLEM, image_from, read_zip, upload, wait_done

from autocontour.config import Settings
from autocontour.dicom.outputs import read_rtstruct
from autocontour.dicom.reading import read_input
from autocontour.server.auth import hash_key

PLANNER = {"Authorization": "Bearer planner-key"}
VIEWER = {"Authorization": "Bearer viewer-key"}
OTHER = {"Authorization": "Bearer other-key"}
BLADDER, VERTEBRA_L4 = 104, 19  # examples/pelvis_ct/labels.json


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_weights):
    keys = {"planner": {"sha256": hash_key("planner-key"), "scopes": ["segment", "read"]},
            "viewer": {"sha256": hash_key("viewer-key"), "scopes": ["read"]},
            "other": {"sha256": hash_key("other-key"), "scopes": ["segment", "read"]}}
    s = start_server(tmp_path_factory.mktemp("editing"), small_weights, api_keys=keys)
    yield s
    s.stop()
    assert "drawn" not in s.logs() and "ct.nii.gz" not in s.logs()  # no file names in the logs


@pytest.fixture(scope="module")
def job(server) -> str:
    """The example CT segmented for the bladder only."""
    response = upload(server.url, EXAMPLE_CT, {"structures": "bladder"}, params={"wait": "true"}, headers=PLANNER)
    assert response.status_code == 200, response.text
    return response.headers["x-job-id"]


def labels() -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(EXAMPLE_LABELS)))  # (k, j, i)


def nifti(array: np.ndarray, like: sitk.Image) -> bytes:
    """A mask on `like`'s grid as .nii.gz bytes."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "drawn.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        return path.read_bytes()


def edit(server, job_id: str, structure: str, drawn: bytes, headers=PLANNER, **form) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/segmentations/{job_id}/structures/{structure}/propagate",
                      files={"drawn": ("drawn.nii.gz", drawn)}, data=form, headers=headers, timeout=300)


def mask(server, job_id: str, structure: str, tmp_path, **params) -> np.ndarray:
    response = httpx.get(f"{server.url}/v1/segmentations/{job_id}/masks/{structure}", params=params, headers=PLANNER)
    assert response.status_code == 200, response.text
    return sitk.GetArrayFromImage(image_from(response.content, tmp_path, f"{structure}-{params}.nii.gz"))


def ct_grid() -> sitk.Image:
    return sitk.ReadImage(str(EXAMPLE_CT))


@pytest.fixture(scope="module")
def propagated(server, job) -> tuple[list[int], np.ndarray, dict]:
    """L4 (not segmented by the job) propagated from three drawn slices."""
    vertebra = labels() == VERTEBRA_L4
    slices = [56, 61, 66]
    drawn = np.zeros_like(vertebra)
    drawn[slices] = vertebra[slices]
    response = edit(server, job, "vertebra_l4", nifti(drawn, ct_grid()), ends="drawn")
    assert response.status_code == 200, response.text
    return slices, drawn, response.json()


def test_a_structure_the_job_did_not_segment_is_propagated_from_three_drawn_slices(server, job, propagated, tmp_path):
    slices, drawn, version = propagated
    assert version["version"] == 0 and version["kind"] == "propagate" and version["based_on"] is None
    assert version["drawn_slices"] == slices and version["author"] == "planner" and version["volume_ml"] > 0
    assert version["seconds"] > 0
    fetched = mask(server, job, "vertebra_l4", tmp_path)
    assert np.array_equal(fetched[slices], drawn[slices])  # exactly as drawn
    filled = np.nonzero(fetched.any(axis=(1, 2)))[0]
    assert filled.min() >= slices[0] and filled.max() <= slices[-1]  # ends=drawn
    if version["next_slice"] is not None:
        assert slices[0] < version["next_slice"] < slices[-1]


@pytest.fixture(scope="module")
def corrected(server, job, tmp_path_factory) -> dict:
    """The bladder's draft corrected on one slice (the reference contour there)."""
    folder = tmp_path_factory.mktemp("corrected")
    draft = mask(server, job, "bladder", folder)
    reference = labels() == BLADDER
    k = 18
    correction = np.zeros_like(reference)
    correction[k] = reference[k]
    response = edit(server, job, "bladder", nifti(correction, ct_grid()), slices=str(k))
    assert response.status_code == 200, response.text
    return {"draft": draft, "k": k, "reference": reference, "version": response.json(),
            "after": mask(server, job, "bladder", folder)}


def test_a_correction_is_version_1_on_the_draft_and_changes_only_what_it_lists(server, job, corrected, tmp_path):
    version, k, draft, after = corrected["version"], corrected["k"], corrected["draft"], corrected["after"]
    assert version["version"] == 1 and version["kind"] == "refine" and version["based_on"] == 0
    assert version["corrected_slices"] == [k] and k in version["drawn_slices"]
    assert np.array_equal(after[k], corrected["reference"][k])  # the correction, exactly
    differs = [int(z) for z in np.nonzero((after != draft).any(axis=(1, 2)))[0]]
    assert differs == version["changed_slices"] and k in differs  # listed slices differ, every other is as it was
    assert np.array_equal(mask(server, job, "bladder", tmp_path, version=0), draft)  # the draft is kept
    listed = httpx.get(f"{server.url}/v1/segmentations/{job}/structures/bladder/versions", headers=PLANNER).json()
    assert [v["version"] for v in listed] == [0, 1] and listed[0]["kind"] == "draft"
    assert listed[1] == version
    missing = httpx.get(f"{server.url}/v1/segmentations/{job}/masks/bladder", params={"version": 7}, headers=PLANNER)
    assert missing.status_code == 404 and "no version 7" in missing.json()["detail"]
    summary = httpx.get(f"{server.url}/v1/segmentations/{job}/summary", headers=PLANNER).json()
    assert summary["versions"]["bladder"]["version"] == 1


def test_approve_publishes_the_newest_versions_and_later_edits_wait_for_the_next(server, job, propagated, corrected,
                                                                                 tmp_path):
    response = httpx.post(f"{server.url}/v1/segmentations/{job}/approve", headers=PLANNER, timeout=120)
    assert response.status_code == 200, response.text
    approval = response.json()
    assert approval["by"] == "planner" and approval["versions"] == {"bladder": 1, "vertebra_l4": 0}
    summary = httpx.get(f"{server.url}/v1/segmentations/{job}/summary", headers=PLANNER).json()
    assert summary["approval"] == approval
    assert httpx.get(f"{server.url}/v1/segmentations/{job}", headers=PLANNER).json()["result"]["approval"][
        "versions"] == approval["versions"]
    files = read_zip(httpx.get(f"{server.url}/v1/segmentations/{job}/result", headers=PLANNER).content)
    zipped = {n: sitk.GetArrayFromImage(image_from(files[f"{n}.nii.gz"], tmp_path, f"z-{n}.nii.gz"))
              for n in ("bladder", "vertebra_l4")}
    assert np.array_equal(zipped["bladder"], corrected["after"])
    assert np.array_equal(zipped["vertebra_l4"], mask(server, job, "vertebra_l4", tmp_path, version=0))
    assert json.loads(files["summary.json"])["approval"] == approval
    # an edit after approval is a new version; the approved files stay what was approved
    k = corrected["k"] + 1
    again = np.zeros_like(corrected["reference"])
    again[k] = corrected["reference"][k]
    later = edit(server, job, "bladder", nifti(again, ct_grid()), slices=str(k))
    assert later.status_code == 200 and later.json()["version"] == 2 and later.json()["based_on"] == 1
    assert np.array_equal(mask(server, job, "bladder", tmp_path)[k], corrected["reference"][k])
    files = read_zip(httpx.get(f"{server.url}/v1/segmentations/{job}/result", headers=PLANNER).content)
    assert np.array_equal(sitk.GetArrayFromImage(image_from(files["bladder.nii.gz"], tmp_path, "z2.nii.gz")),
                          corrected["after"])


def refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    detail = response.json()["detail"]
    assert all(w in detail for w in words), detail


def test_bad_edits_are_refused_naming_the_problem(server, job):
    reference, like = labels() == BLADDER, ct_grid()
    one = np.zeros_like(reference)
    one[18] = reference[18]
    good = nifti(one, like)
    shifted = sitk.GetImageFromArray(one.astype(np.uint8))
    shifted.CopyInformation(like)
    shifted.SetOrigin([o + 5.0 for o in like.GetOrigin()])
    refused(edit(server, job, "bladder", nifti(one, shifted)), 422, "not on the CT's grid", "origin")
    small = sitk.GetImageFromArray(one[:, :50].astype(np.uint8))
    refused(edit(server, job, "bladder", nifti(one[:, :50], small)), 422, "not on the CT's grid", "size")
    refused(edit(server, job, "bladder", good, slices="18,500"), 422, "slice 500 is outside the scan")
    refused(edit(server, job, "bladder", good, slices="a,b"), 422, "slices", "comma-separated")
    refused(edit(server, job, "prostate", nifti(np.zeros_like(one), like)), 422, "empty")
    refused(edit(server, job, "prostate", good, slices="17"), 422, "slice 17", "holds nothing")
    refused(edit(server, job, "Bad-Name!", good), 422, "invalid structure name")
    refused(edit(server, job, "prostate", good, colour="red"), 422, "colour", "#rrggbb", "'red'")
    refused(edit(server, job, "prostate", good, colour="#12ab3"), 422, "colour", "#rrggbb")
    refused(edit(server, job, "prostate", good, display_name="GTV\\1"), 422, "display_name", "backslash")
    refused(edit(server, job, "prostate", good, display_name="x" * 65), 422, "display_name", "64")
    refused(edit(server, job, "prostate", good, display_name="   "), 422, "display_name")
    refused(edit(server, job, "bladder", good, colour="#ff0000"), 422, "bladder was segmented")
    refused(edit(server, job, "bladder", b"not a nifti at all"), 422)
    refused(edit(server, job, "bladder", good, headers=OTHER), 404, "no segmentation job")
    refused(edit(server, job, "bladder", good, headers=VIEWER), 403, "may not segment")
    refused(edit(server, "0" * 32, "bladder", good), 404, "no segmentation job")
    refused(httpx.post(f"{server.url}/v1/segmentations/{job}/approve", headers=VIEWER), 403)
    refused(httpx.get(f"{server.url}/v1/segmentations/{job}/structures/prostate/versions", headers=PLANNER), 404,
            "no structure 'prostate'")
    waiting = upload(server.url, EXAMPLE_CT, {"structures": "bladder"}, headers=PLANNER).json()["id"]
    refused(edit(server, waiting, "bladder", good), 409, "the job is")
    httpx.delete(f"{server.url}/v1/segmentations/{waiting}", headers=PLANNER)
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_an_approved_dicom_job_has_an_approved_rtstruct_with_the_drawn_contours(server, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((DATA / "dicom_ct").glob("CT.*")):
            archive.write(path, path.name)
    response = httpx.post(f"{server.url}/v1/segmentations", files={"file": ("ct.zip", buffer.getvalue())},
                          data={"structures": "bladder", "axial_search": "all"}, headers=PLANNER, timeout=120)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert wait_done(server.url, job_id, headers=PLANNER)["status"] == "done"
    grid = image_from(httpx.get(f"{server.url}/v1/segmentations/{job_id}/masks/bladder", headers=PLANNER).content,
                      tmp_path, "grid.nii.gz")
    shape = sitk.GetArrayFromImage(grid).shape
    drawn = np.zeros(shape, dtype=bool)
    slices = [5, 10, 15]
    for k in slices:  # a block in the middle of the slice, a little smaller towards the ends
        half = 12 - abs(k - 10)
        drawn[k, shape[1] // 2 - half:shape[1] // 2 + half, shape[2] // 2 - half:shape[2] // 2 + half] = True
    version = edit(server, job_id, "lesion", nifti(drawn, grid), ends="drawn", display_name=" GTV lesion 1 ",
                   colour="#12AB34")
    assert version.status_code == 200, version.text
    approval = httpx.post(f"{server.url}/v1/segmentations/{job_id}/approve", headers=PLANNER, timeout=120).json()
    assert approval["versions"]["lesion"] == 0 and "rtstruct.dcm" in approval["files"]
    rtstruct = tmp_path / "rtstruct.dcm"
    rtstruct.write_bytes(httpx.get(f"{server.url}/v1/segmentations/{job_id}/dicom/rtstruct", headers=PLANNER).content)
    ds = pydicom.dcmread(rtstruct)
    assert ds.ApprovalStatus == "APPROVED" and str(ds.ReviewerName) == "planner" and ds.ReviewDate
    _, series = read_input(DATA / "dicom_ct", Settings())
    assert series is not None
    contours = read_rtstruct(series, rtstruct)
    assert np.array_equal(contours["GTV lesion 1"][slices], drawn[slices])  # the approved version, as drawn
    numbers = {str(r.ROIName): r.ROINumber for r in ds.StructureSetROISequence}
    colours = {r.ReferencedROINumber: [int(c) for c in r.ROIDisplayColor] for r in ds.ROIContourSequence}
    assert colours[numbers["GTV lesion 1"]] == [0x12, 0xAB, 0x34]  # as the reviewer chose it
    seg = pydicom.dcmread(io.BytesIO(httpx.get(f"{server.url}/v1/segmentations/{job_id}/dicom/seg",
                                               headers=PLANNER).content))
    assert "GTV lesion 1" in [str(s.SegmentLabel) for s in seg.SegmentSequence]
    files = read_zip(httpx.get(f"{server.url}/v1/segmentations/{job_id}/result", headers=PLANNER).content)
    assert pydicom.dcmread(io.BytesIO(files["rtstruct.dcm"])).ApprovalStatus == "APPROVED"
    assert "source" not in " ".join(files)  # the kept series is not part of the result
    assert httpx.delete(f"{server.url}/v1/segmentations/{job_id}", headers=PLANNER).status_code == 204


def test_with_celery_a_worker_runs_the_edit_and_without_one_it_is_503(tmp_path, small_weights):
    """Distributed mode: the API holds no network, so the edit is a task a worker answers (from the shared data
    folder); with no live worker the edit is refused with 503 + Retry-After, naming why."""
    from redis_server import start_redis
    from servers import service_env, start_worker

    redis = start_redis(tmp_path / "redis")
    data = tmp_path / "shared"
    data.mkdir()
    settings = dict(queue="celery", broker_url=redis.url, threads=1, worker_timeout_s=6)
    worker = start_worker(service_env(data, small_weights, **settings), "editor@test", data)
    api = start_server(data, small_weights, **settings)
    try:
        done = upload(api.url, EXAMPLE_CT, {"structures": "bladder"}, params={"wait": "true"})
        assert done.status_code == 200, done.text
        job_id = done.headers["x-job-id"]
        vertebra = labels() == VERTEBRA_L4
        drawn = np.zeros_like(vertebra)
        drawn[[56, 61, 66]] = vertebra[[56, 61, 66]]
        response = edit(api, job_id, "vertebra_l4", nifti(drawn, ct_grid()), headers={}, ends="drawn")
        assert response.status_code == 200, response.text
        assert response.json()["drawn_slices"] == [56, 61, 66] and response.json()["author"] is None
        fetched = mask(api, job_id, "vertebra_l4", tmp_path)
        assert np.array_equal(fetched[[56, 61, 66]], drawn[[56, 61, 66]])
        worker.kill(signal.SIGTERM)
        unanswered = edit(api, job_id, "vertebra_l4", nifti(drawn, ct_grid()), headers={})
        refused(unanswered, 503, "no worker is alive")
        assert int(unanswered.headers["retry-after"]) > 0
        assert not list((data / "uploads").rglob("drawn-*"))  # no drawn mask left behind
    finally:
        api.stop()
        worker.kill(signal.SIGTERM)
        redis.stop()
