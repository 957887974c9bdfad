"""Approve on the review page with "add this patient to the support set" ticked, in a real headless Chromium.

The server holds a copy of the shipped bladder set (the shipped folder is never written) and its key may write
support sets. A phantom CT goes up through the page; its bladder is corrected on three slices from the phantom's
labels (over HTTP: the brush itself is tested in test_review_editing), then the reviewer ticks the box and
approves. The set on disk gains the case with its provenance, and the next job is segmented with the grown set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ROOT, write_phantom
from servers import start_server
from test_editing_http import BLADDER, edit, nifti
from test_review_page import CHROMIUM, FLAGS
from test_server import upload

from autocontour.config import Settings
from autocontour.server.auth import hash_key
from autocontour.support.store import MANIFEST

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
CLINIC = {"Authorization": "Bearer clinic-key"}


def test_approve_with_the_box_ticked_adds_the_patient_to_the_support_set(tmp_path, small_weights, screenshots):
    from playwright.sync_api import sync_playwright

    sets = tmp_path / "sets"
    shutil.copytree(ROOT / "support_sets" / "bladder", sets / "bladder")
    before = json.loads((sets / "bladder" / MANIFEST).read_text())
    ct, labels = write_phantom(tmp_path / "phantom", 13)
    keys = {"clinic": {"sha256": hash_key("clinic-key"), "scopes": ["segment", "read", "support:write"]}}
    weights = Settings().default_weights if os.environ.get("AUTOCONTOUR_SCREENSHOTS") else small_weights  # docs
    server = start_server(tmp_path / "data", weights, support_dirs=[sets], api_keys=keys)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            page.click("summary")
            page.fill("#api-key", "clinic-key")
            page.press("#api-key", "Tab")
            page.wait_for_selector("input[name=structures][value=bladder]:checked")
            page.set_input_files("#ct-file", str(ct))
            page.click("#submit-button")
            page.wait_for_selector("#review-section:not([hidden])", timeout=600_000)
            job = page.evaluate("() => state.job.id")
            correct_the_bladder(server, job, ct, labels)
            page.check("input[name=add-to-support][value=bladder]")
            page.click("#approve")
            page.wait_for_selector("#support-added li", timeout=300_000)
            text = page.inner_text("#support-added")
            page.screenshot(path=str(screenshots / "edit-added-to-support-set.png"))
            browser.close()
        after = json.loads((sets / "bladder" / MANIFEST).read_text())
        assert f"now {len(before['source_cases']) + 1} patients" in text, text
        assert len(after["source_cases"]) == len(before["source_cases"]) + 1
        provenance = after["source_cases"][-1]["provenance"]
        assert provenance["kind"] == "result" and provenance["job_id"] == job
        assert provenance["approval"] == "APPROVED" and provenance["approved_by"] == "clinic"
        grown_id = f"{after['name']}-{after['content_hash'][:12]}"
        assert grown_id in text
        second = upload(server.url, ct, {"structures": "bladder"}, params={"wait": "true"}, headers=CLINIC)
        assert second.status_code == 200, second.text
        summary = httpx.get(f"{server.url}/v1/segmentations/{second.headers['x-job-id']}/summary",
                            headers=CLINIC).json()
        assert summary["structures"]["bladder"]["support_set"]["id"] == grown_id  # the next job uses it
    finally:
        server.stop()


def correct_the_bladder(server, job: str, ct: Path, labels: Path) -> None:
    """The phantom's bladder drawn on three slices spread over it, as a correction of the draft."""
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(labels))) == BLADDER
    filled = np.nonzero(reference.any(axis=(1, 2)))[0]
    slices = [int(filled[len(filled) * q // 4]) for q in (1, 2, 3)]
    drawn = np.zeros_like(reference)
    drawn[slices] = reference[slices]
    response = edit(server, job, "bladder", nifti(drawn, sitk.ReadImage(str(ct))), CLINIC,
                    slices=",".join(map(str, slices)))
    assert response.status_code == 200, response.text
