"""Our RTSTRUCT and DICOM-SEG as third-party tools read them: dciodvfy (the IOD) and plastimatch (rasterisation
the way planning systems do it), on the example CT written as a DICOM series with a non-square grid and a
UTF-8 patient name; from a folder, through the CLI, and through a real PACS (pull, push, read back)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DATA, EXAMPLE_CT, EXAMPLE_LABELS, RECIPES
from dicom_tools import (
    DEFINITIONS,
    INPUT_ATTRIBUTES,
    PATIENT_NAME,
    dciodvfy_errors,
    dice,
    plastimatch_masks,
    write_ct_series,
)
from orthanc import start_orthanc, upload_folder

from autocontour.cli import main
from autocontour.dicom import pacs
from autocontour.dicom.outputs import read_rtstruct, read_seg, write_rtstruct, write_seg
from autocontour.dicom.series import read_series
from autocontour.support.recipes import load_recipes

MAX_VOLUME_DIFFERENCE = 0.03
MIN_DICE = 0.97


@pytest.fixture(scope="module")
def example_series(tmp_path_factory) -> Path:
    return write_ct_series(EXAMPLE_CT, tmp_path_factory.mktemp("example") / "ct")


@pytest.fixture(scope="module")
def reference_masks(example_series) -> dict[str, np.ndarray]:
    """Bladder, anorectum and CTVn made by the shipped recipes from the example CT's label map."""
    labels = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(EXAMPLE_LABELS)), "LPS"))
    names = {v: int(k) for k, v in json.loads((EXAMPLE_LABELS.parent / "labels.json").read_text()).items()}
    spacing_zyx = read_series(example_series).image.GetSpacing()[::-1]
    recipes = load_recipes(RECIPES)
    return {n: recipes[n].evaluate(labels, names, spacing_zyx) for n in ("bladder", "anorectum", "ctvn")}


def assert_third_party_checks(rtstruct: Path, seg: Path, ct_folder: Path, masks: dict[str, np.ndarray],
                              work: Path) -> dict[str, tuple[float, float]]:
    """dciodvfy finds no error in either file; plastimatch's rasterisation of every ROI (slice contours
    combined by union, its default, and by XOR) is within 3% of our mask's volume with Dice >= 0.97; the
    patient and study attributes, character set included, are the input's. Returns ROI -> (ratio, Dice)."""
    for path in (rtstruct, seg):
        assert dciodvfy_errors(path) == [], path.name
    measured = {}
    for xor in (False, True):
        rasterised = plastimatch_masks(rtstruct, ct_folder, work / f"plastimatch-{'xor' if xor else 'or'}", xor)
        shown = {DEFINITIONS[n].display_name: m for n, m in masks.items() if m.any()}
        assert set(rasterised) == set(shown)
        for name, mask in shown.items():
            ratio, overlap = rasterised[name].sum() / mask.sum(), dice(rasterised[name], mask)
            assert abs(ratio - 1) <= MAX_VOLUME_DIFFERENCE and overlap >= MIN_DICE, (name, xor, ratio, overlap)
            measured[name] = (float(ratio), float(overlap))
    for path in (rtstruct, seg):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == PATIENT_NAME
        for keyword in ("PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName",
                        "StudyID", "StudyDate", "StudyTime"):
            assert str(ds.get(keyword)) == INPUT_ATTRIBUTES[keyword], (path.name, keyword)
    ds = pydicom.dcmread(rtstruct)
    assert ds.InstitutionName == INPUT_ATTRIBUTES["InstitutionName"]
    assert ds.StructureSetDate == ds.SeriesDate != ds.StudyDate  # the structure set's own date, not the CT's
    assert ds.FrameOfReferenceUID == pydicom.dcmread(next(ct_folder.iterdir())).FrameOfReferenceUID
    assert all(c.NumberOfContourPoints >= 3 for r in ds.ROIContourSequence for c in r.ContourSequence)
    return measured


def test_rtstruct_and_seg_as_third_party_tools_read_them(example_series, reference_masks, tmp_path):
    series = read_series(example_series)
    assert series.image.GetSize() == (122, 101, 112)  # rows differ from columns
    rtstruct = write_rtstruct(series, reference_masks, tmp_path / "rtstruct.dcm", {}, DEFINITIONS)
    seg = write_seg(series, reference_masks, tmp_path / "seg.dcm", {"name": "m", "sha256": "ab" * 32}, {},
                    DEFINITIONS)
    measured = assert_third_party_checks(rtstruct, seg, example_series, reference_masks, tmp_path)
    print("plastimatch volume ratio and Dice per ROI:", measured)
    back_rt, back_seg = read_rtstruct(series, rtstruct), read_seg(series, seg)
    for name, mask in reference_masks.items():
        display = DEFINITIONS[name].display_name
        assert np.array_equal(back_rt[display], mask) and np.array_equal(back_seg[display], mask), name


def test_holes_islands_and_touching_corners(example_series, tmp_path):
    """A ring with an island in its hole, pixels touching only at a corner, a one-voxel piece: plastimatch and
    our reader see exactly the mask, whether they combine a slice's contours by union or by XOR."""
    series = read_series(example_series)
    mask = np.zeros(sitk.GetArrayViewFromImage(series.image).shape, dtype=bool)
    mask[50, 20:60, 30:90] = True
    mask[50, 28:52, 40:80] = False  # the hole
    mask[50, 35:45, 55:65] = True  # an island in it
    mask[50, 70, 70] = mask[50, 71, 71] = mask[50, 72, 70] = True  # touching at corners
    mask[51, 5, 5] = True  # one voxel
    masks = {"bladder": mask}
    rtstruct = write_rtstruct(series, masks, tmp_path / "rtstruct.dcm", {}, DEFINITIONS)
    for xor in (False, True):
        rasterised = plastimatch_masks(rtstruct, example_series, tmp_path / f"p{xor}", xor)
        assert np.array_equal(rasterised["Bladder"], mask), xor
    assert np.array_equal(read_rtstruct(series, rtstruct)["Bladder"], mask)


def _found_masks(out: Path) -> dict[str, np.ndarray]:
    masks = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{n}.nii.gz"))).astype(bool) for n in DEFINITIONS
             if (out / f"{n}.nii.gz").exists()}
    assert any(m.any() for m in masks.values())
    return masks


def test_segment_a_series_of_a_mixed_folder(example_series, tmp_path, capsys, small_weights):
    """`autocontour segment SERIES_DIR`: a folder with a second CT series is refused with the list, --series
    picks one, and its RTSTRUCT and SEG pass the third-party checks against the NIfTI masks."""
    mixed = tmp_path / "mixed"
    shutil.copytree(example_series, mixed)
    for path in DATA.joinpath("dicom_ct").glob("CT.*"):
        shutil.copy(path, mixed / path.name)
    chosen = read_series(example_series).series_uid
    options = ["--weights", str(small_weights), "--support-size", "2", "--quiet", "--no-preview"]
    for extra, words in (([], "2 CT series found, choose one with --series UID"),
                         (["--series", "1.2.3.999"], "CT series 1.2.3.999 is not in the input")):
        assert main(["segment", str(mixed), "--out", str(tmp_path / "refused"), *options, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and f"{chosen} (112 slices)" in err, err
    out = tmp_path / "out"
    assert main(["segment", str(mixed), "--out", str(out), "--series", chosen, "--roi-names", "tg263", *options]) == 0
    measured = assert_third_party_checks(out / "rtstruct.dcm", out / "seg.dcm", example_series, _found_masks(out),
                                         tmp_path)
    print("plastimatch volume ratio and Dice per ROI (CLI):", measured)


def test_pacs_pull_push_and_read_back(example_series, tmp_path, small_weights):
    """The same checks on what the PACS holds after `pacs pull --push`."""
    orthanc = start_orthanc()
    try:
        upload_folder(orthanc, example_series)
        study = read_series(example_series).study_uid
        out = tmp_path / "out"
        assert main(["pacs", "pull", "--url", orthanc.dicomweb, "--study", study, "--out", str(out), "--push",
                     "--weights", str(small_weights), "--support-size", "2"]) == 0
        client = pacs.connect(orthanc.dicomweb)
        stored = {}
        for found in client.search_for_series(study_instance_uid=study):
            modality, uid = found["00080060"]["Value"][0], found["0020000E"]["Value"][0]
            if modality in ("RTSTRUCT", "SEG"):
                (instance,) = client.retrieve_series(study_instance_uid=study, series_instance_uid=uid)
                stored[modality] = tmp_path / f"{modality}.dcm"
                instance.save_as(str(stored[modality]), enforce_file_format=True)
        assert set(stored) == {"RTSTRUCT", "SEG"}
        measured = assert_third_party_checks(stored["RTSTRUCT"], stored["SEG"], example_series, _found_masks(out),
                                             tmp_path)
        print("plastimatch volume ratio and Dice per ROI (PACS):", measured)
    finally:
        orthanc.stop()
