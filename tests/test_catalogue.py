"""Any structure, any patient: the open catalogue, overlap rules as data, localisation verdicts,
laterality, and support sets from a clinic's own DICOM RT data."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import EXAMPLE_CT, EXAMPLE_LABELS

from autocontour.catalogue import BUILTIN, Catalogue, default_definition
from autocontour.cli import main
from autocontour.dicom.series import read_series
from autocontour.errors import OptionError, SupportSetError, UnknownStructureError
from autocontour.options import SegmentOptions
from autocontour.rules import load_rules
from autocontour.support.build import build_support_set
from autocontour.support.store import load_support_set

SERIES = Path(__file__).resolve().parent / "data" / "dicom_ct"
LABEL_VALUES = {name: int(value)
                for value, name in json.loads((EXAMPLE_LABELS.parent / "labels.json").read_text()).items()}
ORGANS = ("liver", "spleen", "kidney_left")


@pytest.fixture(scope="module")
def organ_sets(tmp_path_factory) -> Path:
    """liver, spleen and kidney_left support sets built from the example CT's labels."""
    root = tmp_path_factory.mktemp("organ_sets")
    for organ in ORGANS:
        build_support_set(organ, organ, [(EXAMPLE_CT, EXAMPLE_LABELS)], root / organ, size=32,
                          label=LABEL_VALUES[organ], preview=False)
    return root


def _upper_abdomen_shifted() -> tuple[sitk.Image, np.ndarray]:
    """The example CT above the pelvis, moved 600 mm along z (another scanner's table position)."""
    ct, labels = sitk.ReadImage(str(EXAMPLE_CT)), sitk.ReadImage(str(EXAMPLE_LABELS))
    upper, upper_labels = ct[:, :, 68:], labels[:, :, 68:]
    origin = list(upper.GetOrigin())
    origin[2] += 600.0
    upper.SetOrigin(origin)
    upper_labels.SetOrigin(origin)
    return upper, sitk.GetArrayFromImage(upper_labels)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_sets_declare_their_structures_and_the_catalogue_shows_them(organ_sets, tmp_path, capsys):
    kidney = load_support_set(organ_sets / "kidney_left")
    assert kidney.definition.laterality == "left" and kidney.definition.display_name == "Kidney left"
    assert not any(s.flipped for s in kidney.manifest.slices)  # a left kidney is never mirrored
    catalogue = Catalogue.from_definitions({n: load_support_set(organ_sets / n).definition for n in ORGANS})
    assert list(catalogue)[:5] == list(BUILTIN.values()) and catalogue.available == ["kidney_left", "liver", "spleen"]
    with pytest.raises(UnknownStructureError, match="loaded: kidney_left, liver, spleen.*support build femur_left"):
        catalogue.parse("liver,femur_left")
    with pytest.raises(SupportSetError, match="left-sided"):
        build_support_set("kidney_left", "kidney_left", [(EXAMPLE_CT, EXAMPLE_LABELS)], tmp_path / "k", size=8,
                          label=LABEL_VALUES["kidney_left"], symmetric=True, preview=False)
    assert main(["structures", "--support-dir", str(organ_sets)]) == 0
    listing = capsys.readouterr().out
    assert "kidney_left" in listing and "liver-" in listing and "overlap rules 'cervix'" in listing
    assert main(["support", "build", "Liver!", "--case", str(EXAMPLE_CT), str(EXAMPLE_LABELS), "--out",
                 str(tmp_path / "x")]) == 2
    assert "invalid structure name" in capsys.readouterr().err
    assert main(["support", "build", "femur_left", "--case", str(EXAMPLE_CT), str(EXAMPLE_LABELS), "--label", "75",
                 "--colour", "10,20", "--out", str(tmp_path / "x")]) == 2
    assert "colour" in capsys.readouterr().err


def test_organs_found_in_another_scan_range_and_the_bladder_not_in_it(organ_sets):
    from autocontour.pipeline import Segmenter

    ct, labels = _upper_abdomen_shifted()
    segmenter = Segmenter(support_dirs=[organ_sets])
    result = segmenter.segment(ct, None, SegmentOptions(structures=[*ORGANS, "bladder"], support_size=8,
                                                        preview=False))
    structures = result.summary.structures
    for organ in ORGANS:
        mask = sitk.GetArrayFromImage(result.masks[organ]).astype(bool)
        assert structures[organ].status == "found"
        assert structures[organ].localisation.verdict == "window"
        assert _dice(mask, labels == LABEL_VALUES[organ]) >= 0.6, organ
        assert structures[organ].definition.name == organ
    kidney = sitk.GetArrayFromImage(result.masks["kidney_left"])
    centre = ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.argwhere(kidney).mean(axis=0)[::-1]])
    body_centre = ct.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in ct.GetSize()])
    assert centre[0] > body_centre[0] + 30  # LPS: +x is the patient's left
    bladder = structures["bladder"]
    assert bladder.status == "not_in_scan" and bladder.volume_ml == 0 and bladder.slices_computed == 0
    assert "outside" not in bladder.status_reason and "the scan spans" in bladder.status_reason
    assert result.summary.overlap_rules["name"] == "cervix"


def test_a_doubtful_window_searches_the_whole_body_and_says_so(phantom_cases, small_weights):
    from autocontour.pipeline import Segmenter

    # shipped sets (from the real CT) against a phantom whose skeleton matches nothing there
    segmenter = Segmenter(weights=small_weights, device="cpu")
    result = segmenter.segment(phantom_cases[0][0], None, SegmentOptions(structures="bladder", support_size=2,
                                                                         preview=False))
    bladder = result.summary.structures["bladder"]
    assert bladder.localisation.verdict == "whole_body"
    assert any("whole body was searched" in w for w in result.summary.warnings)
    z = read_z_range(phantom_cases[0][0])
    lo, hi = bladder.searched_z_mm
    assert lo <= z[0] + 10 and hi >= z[1] - 10
    if bladder.status != "found":
        assert bladder.status in ("not_found_in_searched_range", "below_threshold") and bladder.status_reason


def read_z_range(path: Path) -> tuple[float, float]:
    from autocontour.io import CanonicalCT, read_ct

    z = CanonicalCT(read_ct(path)).slice_positions_mm()
    return float(z[0]), float(z[-1])


def test_axial_search_all_searches_every_body_slice(small_weights):
    from autocontour.pipeline import Segmenter

    ct, _ = _upper_abdomen_shifted()
    result = Segmenter(weights=small_weights, device="cpu").segment(
        ct, None, SegmentOptions(structures="bladder", support_size=2, axial_search="all", preview=False))
    bladder = result.summary.structures["bladder"]
    assert bladder.localisation.verdict == "not_in_scan" and not bladder.localisation.applied
    assert bladder.slices_computed == ct.GetSize()[2]
    assert any("--axial-search all" in w for w in result.summary.warnings)


def test_rules_files_extend_or_replace_the_shipped_rules(tmp_path):
    extend = tmp_path / "extend.json"
    extend.write_text(json.dumps({"name": "clinic", "extends": "cervix",
                                  "exclusive_groups": [["kidney_left", "spleen"]]}))
    rules = load_rules(extend)
    assert rules.conflicts("kidney_left", "spleen") and rules.conflicts("ctvn", "ctvp")
    assert not rules.conflicts("liver", "spleen")  # named by no rule: not constrained
    replace = tmp_path / "replace.json"
    replace.write_text(json.dumps({"exclusive_groups": [["liver", "spleen"]]}))
    assert not load_rules(replace).conflicts("ctvn", "ctvp") and load_rules(replace).conflicts("liver", "spleen")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"exclusive_groups": [["Liver"]]}))
    with pytest.raises(OptionError, match="invalid structure name"):
        load_rules(bad)
    with pytest.raises(OptionError, match="not found"):
        load_rules(tmp_path / "missing.json")


def test_laterality_warning_flags_a_structure_across_the_midline():
    from autocontour.postprocess import laterality_warning

    body = np.zeros((3, 20, 40), dtype=bool)
    body[:, 2:18, 4:36] = True  # midline at x = 19.5
    left = np.zeros_like(body)
    left[:, 8:12, 24:32] = True  # LPS: larger x is the patient's left
    assert laterality_warning(left, body, "left") is None
    crossing = laterality_warning(left, body, "right")
    assert crossing and crossing["slices"] == [0, 1, 2] and "check the side" in crossing["warning"]


def _dicom_case(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A mask on the 20-slice DICOM series: a NIfTI file on the series' grid, and the array."""
    series = read_series(SERIES)
    hu = sitk.GetArrayFromImage(series.image)
    z, y, x = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    blob = ((y - 250) / 70.0) ** 2 + ((x - 300) / 55.0) ** 2 + ((z - 9) / 7.0) ** 2 <= 1
    mask = sitk.GetImageFromArray(blob.astype(np.uint8))
    mask.CopyInformation(series.image)
    path = tmp_path / "blob.nii.gz"
    sitk.WriteImage(mask, str(path))
    return path, blob


def _assert_same_set(a, b) -> None:
    assert [(s.slice_index, s.flipped) for s in a.manifest.slices] == [(s.slice_index, s.flipped)
                                                                       for s in b.manifest.slices]
    assert _dice(a.labels > 0, b.labels > 0) >= 0.97


def test_support_build_from_dicom_and_rtstruct_matches_the_nifti_mask(tmp_path, capsys):
    from autocontour.dicom.outputs import write_rtstruct

    nifti_mask, blob = _dicom_case(tmp_path)
    series = read_series(SERIES)
    definition = default_definition("gtv_liver", display_name="GTV liver", interpreted_type="GTV")
    rtstruct = write_rtstruct(series, {"gtv_liver": blob}, tmp_path / "rtstruct.dcm", {}, {"gtv_liver": definition},
                              approved_by="Sato^Hanako")  # a clinic's approved contours
    from_nifti = build_support_set("gtv_liver", "gtv_liver", [(SERIES, nifti_mask)], tmp_path / "a", size=8,
                                   preview=False)
    assert main(["support", "build", "gtv_liver", "--case", str(SERIES), str(rtstruct), "--roi", "Tumour",
                 "--roi", "gtv liver", "--size", "8", "--interpreted-type", "GTV", "--out", str(tmp_path / "b")]) == 0
    from_rtstruct = load_support_set(tmp_path / "b")
    _assert_same_set(from_nifti, from_rtstruct)
    assert from_rtstruct.manifest.source_cases[0].label == "RTSTRUCT ROI 'GTV liver'"
    assert from_rtstruct.definition.interpreted_type == "GTV"
    assert main(["support", "build", "gtv_liver", "--case", str(SERIES), str(rtstruct), "--roi", "Rectum",
                 "--out", str(tmp_path / "c")]) == 2
    assert "no ROI named 'Rectum'" in capsys.readouterr().err


def test_support_build_from_the_pacs_takes_the_approved_rtstruct_not_our_newer_draft(tmp_path, capsys):
    from orthanc import pacs_copy, start_orthanc, upload_folder

    from autocontour.dicom.outputs import write_rtstruct

    study = pacs_copy(SERIES, tmp_path / "pacs")
    series = read_series(tmp_path / "pacs")
    nifti_mask, blob = _dicom_case(tmp_path)
    approved = write_rtstruct(series, {"bladder": blob}, tmp_path / "approved" / "rtstruct.dcm", {}, BUILTIN,
                              approved_by="Sato^Hanako", approved_at=datetime(2024, 3, 12, 9, 30))
    older = pydicom.dcmread(approved)
    older.StructureSetDate, older.StructureSetTime = "20240312", "093000"  # approved before the draft was pushed
    older.save_as(approved)
    shifted = np.roll(blob, 40, axis=2)  # the draft differs, so taking it would show
    draft = write_rtstruct(series, {"bladder": shifted}, tmp_path / "draft" / "rtstruct.dcm", {}, BUILTIN)
    build = ["support", "build", "bladder", "--pacs-url", None, "--study", study, "--roi", "bladder", "--size", "8",
             "--symmetric", "--out", str(tmp_path / "from_pacs")]
    orthanc = start_orthanc()
    try:
        build[4] = orthanc.dicomweb
        upload_folder(orthanc, tmp_path / "pacs")
        upload_folder(orthanc, draft.parent)
        capsys.readouterr()
        assert main(build) == 2  # only autocontour's own draft is there
        err = capsys.readouterr().err
        assert "no RTSTRUCT on its CT that a clinician approved" in err and "--allow-unapproved" in err
        assert err.count("\n") == 1 and not (tmp_path / "from_pacs" / "manifest.json").exists()
        upload_folder(orthanc, approved.parent)
        assert main(build) == 0
    finally:
        orthanc.stop()
    from_nifti = build_support_set("bladder", "bladder", [(tmp_path / "pacs", nifti_mask)], tmp_path / "n", size=8,
                                   symmetric=True, preview=False)
    from_pacs = load_support_set(tmp_path / "from_pacs")
    _assert_same_set(from_nifti, from_pacs)
    provenance = from_pacs.manifest.source_cases[0].provenance
    assert provenance is not None and provenance.kind == "pacs" and provenance.study_uid == study
    assert (provenance.approval, provenance.approved_by, provenance.approved_on) == ("APPROVED", "Sato^Hanako",
                                                                                     "20240312093000")


def test_a_corrected_result_becomes_a_support_case(organ_sets, tmp_path, small_weights, capsys):
    result = tmp_path / "result"
    assert main(["segment", str(EXAMPLE_CT), "--out", str(result), "--structures", "spleen", "--support-dir",
                 str(organ_sets), "--weights", str(small_weights), "--support-size", "2", "--no-preview",
                 "--quiet"]) == 0
    corrected = sitk.ReadImage(str(EXAMPLE_LABELS)) == LABEL_VALUES["spleen"]  # the reviewer's corrected contour
    sitk.WriteImage(sitk.Cast(corrected, sitk.sitkUInt8), str(tmp_path / "spleen_corrected.nii.gz"))
    assert main(["support", "build", "spleen", "--from-result", str(result), "--mask",
                 str(tmp_path / "spleen_corrected.nii.gz"), "--ct", str(EXAMPLE_CT), "--size", "8",
                 "--out", str(tmp_path / "grown")]) == 0
    grown = load_support_set(tmp_path / "grown")
    assert grown.definition == load_support_set(organ_sets / "spleen").definition
    other = tmp_path / "other.nii.gz"
    image = sitk.ReadImage(str(EXAMPLE_CT))
    sitk.WriteImage(image[:, :, 1:], str(other))
    capsys.readouterr()
    assert main(["support", "build", "spleen", "--from-result", str(result), "--mask",
                 str(tmp_path / "spleen_corrected.nii.gz"), "--ct", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "fingerprints differ" in capsys.readouterr().err


def test_the_server_lists_what_its_sets_provide(organ_sets, small_weights, tmp_path):
    import httpx
    from servers import start_server

    server = start_server(tmp_path / "data", small_weights, support_dirs=[organ_sets])
    try:
        listed = httpx.get(f"{server.url}/v1/structures").json()
        by_name = {s["name"]: s for s in listed["structures"]}
        assert by_name["kidney_left"]["available"] and by_name["kidney_left"]["laterality"] == "left"
        assert by_name["kidney_left"]["support_set"]["id"].startswith("kidney_left-")
        assert not by_name["ctvp"]["available"] and "support build ctvp" in by_name["ctvp"]["how_to_add"]
        assert listed["overlap_rules"]["name"] == "cervix"
        refused = httpx.post(f"{server.url}/v1/segmentations", data={"structures": "femur_left"},
                             files={"file": ("ct.nii.gz", EXAMPLE_CT.read_bytes())})
        assert refused.status_code == 422 and "loaded:" in refused.json()["detail"]
    finally:
        server.stop()


def test_a_query_takes_its_examples_from_the_source_case_that_looks_like_it():
    from autocontour.engine.selection import level_members, thumbnails

    rng = np.random.default_rng(0)
    looks_like_a, looks_like_b = rng.random((128, 128)), rng.random((128, 128))
    images = np.stack([looks_like_a + rng.normal(0, 0.1, (128, 128)) for _ in range(6)]
                      + [looks_like_b + rng.normal(0, 0.1, (128, 128)) for _ in range(6)]).astype(np.float32)
    cases = np.array(["case0"] * 6 + ["case1"] * 6)
    levels = np.tile(np.linspace(0, 1, 6), 2).astype(np.float32)
    similarity = thumbnails(images) @ thumbnails(looks_like_b[None].astype(np.float32))[0]
    members = level_members(levels, np.ones(12, bool), 0.5, 4, 1, rng, cases, similarity)
    assert set(cases[members[0]]) == {"case1"}
    single = level_members(levels, np.ones(12, bool), 0.5, 4, 1, rng)  # without the anatomy: by level only
    assert set(cases[single[0]]) == {"case0", "case1"}


@pytest.mark.parametrize(("asked", "meant"), [("urinary_bladder", "bladder"), ("bladdr", "bladder"),
                                              ("rectum", "anorectum")])
def test_an_unknown_name_close_to_a_loaded_one_is_answered_with_did_you_mean(asked, meant):
    catalogue = Catalogue.from_definitions({n: BUILTIN[n] for n in ("bladder", "anorectum", "ctvn")})
    with pytest.raises(UnknownStructureError, match=f"did you mean '{meant}'"):
        catalogue.parse(asked)
