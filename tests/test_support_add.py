"""Support sets that grow safely: `support add` keeps the old cases, a scan counts once, only contours a
clinician approved become support cases (the RT Approval module of our RTSTRUCT says which), and every case
records where it came from."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import EXAMPLE_CT, EXAMPLE_LABELS, RECIPES, ROOT
from dicom_tools import DEFINITIONS, dciodvfy_errors, tool, write_ct_series

from autocontour.cli import main
from autocontour.dicom.outputs import write_rtstruct
from autocontour.dicom.series import DicomSeries, read_series
from autocontour.io import CanonicalCT, fingerprint
from autocontour.support.build import build_support_set, read_case_ct
from autocontour.support.recipes import load_recipes
from autocontour.support.store import MANIFEST, load_support_set

SERIES = Path(__file__).resolve().parent / "data" / "dicom_ct"
BLADDER = 104  # the phantoms' bladder label


def _blob(series: DicomSeries) -> np.ndarray:
    """A bladder-sized ellipsoid on the series' grid."""
    shape = sitk.GetArrayViewFromImage(series.image).shape
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((y - 250) / 70.0) ** 2 + ((x - 300) / 55.0) ** 2 + ((z - 9) / 7.0) ** 2 <= 1


def _one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autocontour: error: "), err
    assert all(word in err for word in words), err
    return err


def test_our_rtstruct_is_an_unapproved_draft_unless_a_reviewer_approved_it(tmp_path):
    series = read_series(SERIES)
    masks = {"bladder": _blob(series)}
    draft = pydicom.dcmread(write_rtstruct(series, masks, tmp_path / "draft.dcm", {}, DEFINITIONS))
    assert draft.ApprovalStatus == "UNAPPROVED" and "ReviewerName" not in draft and "ReviewDate" not in draft
    assert "draft" in draft.SeriesDescription
    path = write_rtstruct(series, masks, tmp_path / "approved.dcm", {}, DEFINITIONS, approved_by="Sato^Hanako",
                          approved_at=datetime(2024, 3, 12, 9, 30, 5))
    approved = pydicom.dcmread(path)
    assert approved.ApprovalStatus == "APPROVED" and str(approved.ReviewerName) == "Sato^Hanako"
    assert (approved.ReviewDate, approved.ReviewTime) == ("20240312", "093005")
    assert "draft" not in approved.SeriesDescription.lower()
    assert dciodvfy_errors(path) == []  # the RT Approval module is complete for an approved structure set


def test_support_add_grows_a_set_and_keeps_its_cases(tmp_path, phantom_cases, capsys):
    (ct0, labels0), (ct1, labels1) = phantom_cases
    folder = tmp_path / "bladder"
    assert main(["support", "build", "bladder", "--case", str(ct0), str(labels0), "--label", str(BLADDER),
                 "--size", "10", "--out", str(folder)]) == 0
    before = load_support_set(folder)
    assert main(["support", "add", str(folder), "--case", str(ct1), str(labels1), "--label", str(BLADDER)]) == 0
    assert "1 added" in capsys.readouterr().out
    after = load_support_set(folder)  # its content hash checks out
    old, grown = before.manifest, after.manifest
    assert after.id != before.id and grown.updated and grown.created == old.created
    assert [c.case for c in grown.source_cases] == ["case0", "case1"]
    assert grown.source_cases[0] == old.source_cases[0] and grown.definition == old.definition
    assert grown.slices[:len(old.slices)] == old.slices  # the old slices, as they were
    assert np.array_equal(after.images[:len(before)], before.images)
    assert after.crop_images is not None and before.crop_images is not None
    assert np.array_equal(after.crop_images[:len(before)], before.crop_images)
    added = grown.slices[len(old.slices):]
    assert added and {s.case for s in added} == {"case1"} and len(added) <= len(old.slices)
    assert any(s.foreground_pixels == 0 for s in added) and any(s.foreground_pixels > 0 for s in added)
    assert (folder / grown.source_cases[1].atlas.folder).is_dir()
    provenance = grown.source_cases[1].provenance
    assert provenance is not None and provenance.kind == "file" and provenance.approval is None
    assert provenance.mask_sha256 == hashlib.sha256(labels1.read_bytes()).hexdigest()
    text = (folder / MANIFEST).read_text()
    assert str(ct1.parent) not in text and "labels.nii.gz" not in text  # no file name, no folder name
    assert not list(tmp_path.glob(".*"))  # no staging copy left behind


def test_support_add_refuses_a_scan_the_set_has_and_leaves_the_set_whole(tmp_path, phantom_cases, capsys):
    (ct0, labels0), _ = phantom_cases
    folder = tmp_path / "bladder"
    support = build_support_set("bladder", "bladder", [(ct0, labels0)], folder, size=8, label=BLADDER, preview=False)
    capsys.readouterr()
    assert main(["support", "add", str(folder), "--case", str(ct0), str(labels0), "--label", str(BLADDER)]) == 2
    _one_line_error(capsys, "case1 is the same scan as case0, already in the set")
    assert load_support_set(folder).id == support.id and not list(tmp_path.glob(".*"))
    assert main(["support", "build", "bladder", "--case", str(ct0), str(labels0), "--case", str(ct0), str(labels0),
                 "--label", str(BLADDER), "--out", str(tmp_path / "twice")]) == 2
    _one_line_error(capsys, "case1 is the same scan as case0")


def test_drafts_are_refused_and_approved_rtstructs_join_a_set(tmp_path, phantom_cases, capsys):
    series = read_series(SERIES)
    blob = _blob(series)
    draft = write_rtstruct(series, {"bladder": blob}, tmp_path / "draft.dcm", {}, DEFINITIONS)
    approved = write_rtstruct(series, {"bladder": blob}, tmp_path / "approved.dcm", {}, DEFINITIONS,
                              approved_by="Sato^Hanako", approved_at=datetime(2024, 3, 12, 9, 30))
    folder = tmp_path / "bladder"
    support = build_support_set("bladder", "bladder", phantom_cases[:1], folder, size=8, label=BLADDER, preview=False)
    add = ["support", "add", str(folder), "--case", str(SERIES), None, "--roi", "Bladder"]
    capsys.readouterr()
    assert main([*add[:5], str(draft), *add[6:]]) == 2
    _one_line_error(capsys, "RT Approval status is UNAPPROVED", "--allow-unapproved")
    assert main(["support", "build", "bladder", "--case", str(SERIES), str(draft), "--roi", "Bladder",
                 "--out", str(tmp_path / "from_draft")]) == 2
    _one_line_error(capsys, "no clinician approved", "--allow-unapproved")
    assert load_support_set(folder).id == support.id and not (tmp_path / "from_draft" / MANIFEST).exists()

    ours = pydicom.dcmread(draft)  # our draft, its approval status stripped on the way (optional module)
    del ours.ApprovalStatus
    ours.save_as(tmp_path / "stripped.dcm")
    assert main([*add[:5], str(tmp_path / "stripped.dcm"), *add[6:]]) == 2
    _one_line_error(capsys, "autocontour draft")

    assert main([*add[:5], str(approved), *add[6:], "--slices-per-case", "6"]) == 0
    grown = load_support_set(folder).manifest
    provenance = grown.source_cases[1].provenance
    assert provenance is not None and len(grown.slices) == len(support) + 6
    assert (provenance.kind, provenance.approval, provenance.approved_by, provenance.approved_on) == (
        "file", "APPROVED", "Sato^Hanako", "20240312093000")
    assert provenance.rtstruct_uid == str(pydicom.dcmread(approved).SOPInstanceUID)
    assert grown.source_cases[1].label == "RTSTRUCT ROI 'Bladder'"

    allowed = tmp_path / "allowed"
    assert main(["support", "build", "bladder", "--case", str(SERIES), str(draft), "--roi", "Bladder",
                 "--allow-unapproved", "--size", "8", "--out", str(allowed)]) == 0
    taken = load_support_set(allowed).manifest.source_cases[0].provenance
    assert taken is not None and taken.approval == "UNAPPROVED" and taken.allowed_unapproved


def test_the_same_ct_as_nifti_dicom_folder_zip_and_plastimatch_series_is_one_scan(tmp_path, capsys):
    folder = write_ct_series(EXAMPLE_CT, tmp_path / "dicom")  # LPS, int16, positions as decimal strings
    archive = Path(shutil.make_archive(str(tmp_path / "dicom"), "zip", folder))
    converted = tmp_path / "plastimatch"  # the recipe docs/dicom-pacs.md gives
    subprocess.run([tool("plastimatch"), "convert", "--input", str(EXAMPLE_CT), "--output-dicom", str(converted),
                    "--patient-id", "DEMO-1"], check=True, capture_output=True, timeout=300)
    canonical = {path.name: CanonicalCT(read_case_ct(path)[0]).image
                 for path in (EXAMPLE_CT, folder, archive, converted)}
    prints = {name: fingerprint(image) for name, image in canonical.items()}
    assert len(set(prints.values())) == 1, prints
    shipped = load_support_set(ROOT / "support_sets" / "bladder").manifest.source_cases[0]
    assert shipped.fingerprint == prints["dicom"]  # so a segmentation of the series knows it is the set's own case

    moved = sitk.Image(canonical["dicom"])
    moved.SetOrigin(tuple(v + 0.5 for v in moved.GetOrigin()))
    changed = sitk.Image(canonical["dicom"])
    changed[60, 50, 56] = changed[60, 50, 56] + 1
    assert len({prints["dicom"], fingerprint(moved), fingerprint(changed)}) == 3  # another scan is another scan

    sets = tmp_path / "bladder"
    build_support_set("bladder", "bladder", [(EXAMPLE_CT, EXAMPLE_LABELS)], sets, size=8, preview=False,
                      recipe=load_recipes(RECIPES)["bladder"], atlas=False)
    capsys.readouterr()
    for stored in (folder, archive):
        assert main(["support", "add", str(sets), "--case", str(stored), str(EXAMPLE_LABELS), "--recipe",
                     "bladder"]) == 2
        _one_line_error(capsys, "case1 is the same scan as case0, already in the set")


def test_a_second_addition_to_one_set_waits_and_then_says_the_set_is_busy(tmp_path, monkeypatch):
    """Two additions would share the staging folder: the second waits for the first, and gives up with a
    clear error (503 over HTTP) rather than hanging."""
    from autocontour.errors import SupportSetBusyError
    from autocontour.support import grow

    monkeypatch.setattr(grow, "LOCK_WAIT_S", 0.5)
    target = tmp_path / "sets" / "bladder"
    with grow._one_addition_at_a_time(target):
        with pytest.raises(SupportSetBusyError, match="still running"):
            with grow._one_addition_at_a_time(target):
                pass
    with grow._one_addition_at_a_time(target):  # released: the next addition goes ahead
        pass
