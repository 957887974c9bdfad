"""An approved job's case joins the server's support set over HTTP, and the next job uses the grown set.

A real server on loopback with a copy of the shipped bladder set (the shipped folder is never written) and the
small seeded network. The shipped set was built from the example CT, so that scan is refused as one the set
has; a phantom CT, its bladder corrected on three slices from the phantom's labels and approved, is added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import EXAMPLE_CT, ROOT, write_phantom
from servers import start_server
from test_editing_http import BLADDER, edit, nifti, refused
from test_server import upload

from autocontour.server.auth import hash_key
from autocontour.support.store import MANIFEST

PLANNER = {"Authorization": "Bearer planner-key"}  # segment and read only
CLINIC = {"Authorization": "Bearer clinic-key"}  # also support:write


@pytest.fixture(scope="module")
def support_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clinic-sets")
    shutil.copytree(ROOT / "support_sets" / "bladder", root / "bladder")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_weights, support_root):
    keys = {"planner": {"sha256": hash_key("planner-key"), "scopes": ["segment", "read"]},
            "clinic": {"sha256": hash_key("clinic-key"), "scopes": ["segment", "read", "support:write"]}}
    s = start_server(tmp_path_factory.mktemp("growing"), small_weights, support_dirs=[support_root], api_keys=keys)
    yield s
    s.stop()
    assert "ct.nii.gz" not in s.logs() and "drawn" not in s.logs()  # no file names in the logs


def segmented(server, ct: Path) -> str:
    response = upload(server.url, ct, {"structures": "bladder"}, params={"wait": "true"}, headers=CLINIC)
    assert response.status_code == 200, response.text
    return response.headers["x-job-id"]


def add(server, job: str, structure: str = "bladder", headers=CLINIC) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/segmentations/{job}/structures/{structure}/add-to-support-set",
                      headers=headers, timeout=300)


def approve(server, job: str) -> dict:
    response = httpx.post(f"{server.url}/v1/segmentations/{job}/approve", headers=CLINIC, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def manifest(support_root: Path) -> dict:
    return json.loads((support_root / "bladder" / MANIFEST).read_text())


def test_only_an_approved_case_with_the_write_scope_and_a_set_is_added_and_a_known_scan_is_refused(
        server, support_root):
    before = manifest(support_root)
    job = segmented(server, EXAMPLE_CT)
    refused(add(server, job, headers=PLANNER), 403, "support:write")
    refused(add(server, job), 409, "not approved", "approve it first")
    refused(add(server, job, "anorectum"), 404, "no support set of anorectum")
    refused(add(server, job, "Bad-Name!"), 422, "invalid structure name")
    refused(add(server, "0" * 32), 404, "no segmentation job")
    approve(server, job)
    refused(add(server, job), 409, "same scan", "case0, already in the set")  # the shipped set holds this CT
    assert manifest(support_root) == before  # refused: the set is as it was
    assert not [p.name for p in support_root.iterdir() if p.name.startswith(".")]  # no staging copy left


def test_an_approved_corrected_case_joins_the_set_with_its_provenance_and_the_next_job_uses_it(
        server, support_root, tmp_path):
    ct, labels = write_phantom(tmp_path / "phantom", 13)
    job = segmented(server, ct)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(labels))) == BLADDER
    filled = np.nonzero(reference.any(axis=(1, 2)))[0]
    slices = [int(filled[len(filled) // 4]), int(filled[len(filled) // 2]), int(filled[3 * len(filled) // 4])]
    drawn = np.zeros_like(reference)
    drawn[slices] = reference[slices]
    corrected = edit(server, job, "bladder", nifti(drawn, sitk.ReadImage(str(ct))), CLINIC,
                     slices=",".join(map(str, slices)))
    assert corrected.status_code == 200, corrected.text
    approval = approve(server, job)
    assert approval["versions"]["bladder"] == 1
    before = manifest(support_root)

    response = add(server, job)
    assert response.status_code == 200, response.text
    added = response.json()
    after = manifest(support_root)
    assert added["previous_id"] != added["support_set"]["id"]
    assert added["support_set"]["source_cases"] == len(before["source_cases"]) + 1 == len(after["source_cases"])
    case = after["source_cases"][-1]
    assert case == added["case"] and case["case"] == "case1"
    assert {s["case"] for s in after["slices"][len(before["slices"]):]} == {"case1"}
    provenance = case["provenance"]
    assert provenance["kind"] == "result" and provenance["job_id"] == job and provenance["approval"] == "APPROVED"
    assert provenance["approved_by"] == "clinic" and provenance["approved_on"] == approval["at"]
    assert "job_id" not in after["source_cases"][0]["provenance"]  # the shipped case's record (and hash) as it was
    assert "phantom" not in json.dumps(after) and "ct.nii.gz" not in json.dumps(after)  # no file names

    refused(add(server, job), 409, "same scan")  # once is enough
    catalogue = httpx.get(f"{server.url}/v1/structures", headers=CLINIC).json()["structures"]
    assert next(s for s in catalogue if s["name"] == "bladder")["support_set"]["id"] == added["support_set"]["id"]
    again = segmented(server, ct)
    summary = httpx.get(f"{server.url}/v1/segmentations/{again}/summary", headers=CLINIC).json()
    assert summary["structures"]["bladder"]["support_set"]["id"] == added["support_set"]["id"]
