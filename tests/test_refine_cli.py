"""`autocontour refine` and the drawn-slices inputs of `propagate`: corrections on a result are new versions, the
corrected slices come back exactly, what a correction cannot affect is untouched, an RTSTRUCT drawn on three
slices is a valid drawing. A small seeded network: only the contract is checked, not the quality."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.catalogue import default_definition
from autocontour.cli import main
from autocontour.dicom.outputs import write_rtstruct
from autocontour.dicom.roi import rtstruct_mask
from autocontour.dicom.series import read_series
from tests.conftest import EXAMPLE_CT, EXAMPLE_LABELS
from tests.dicom_tools import write_ct_series

BLADDER = 104  # examples/pelvis_ct/labels.json


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, sitk.Image, list[int]]:
    """The example's bladder (input k, j, i), its label image, and three slices a planner would draw."""
    labels = sitk.ReadImage(str(EXAMPLE_LABELS))
    bladder = sitk.GetArrayFromImage(labels) == BLADDER
    ks = np.nonzero(bladder.any(axis=(1, 2)))[0]
    middle = (int(ks.min()) + int(ks.max())) // 2
    return bladder, labels, [middle - 6, middle, middle + 6]


def write_mask(array: np.ndarray, like: sitk.Image, path) -> str:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return str(path)


def cli(small_weights, *args: str) -> int:
    return main([*args, "--weights", str(small_weights), "--device", "cpu", "--quiet"])


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) != 0


@pytest.fixture(scope="module")
def propagated(small_weights, reference, tmp_path_factory):
    """A propagation from three drawn slices (version 0), ends drawn."""
    bladder, labels, slices = reference
    folder = tmp_path_factory.mktemp("refine")
    only = np.zeros_like(bladder)
    only[slices] = bladder[slices]
    drawn = write_mask(only, labels, folder / "drawn.nii.gz")
    out = folder / "result"
    assert cli(small_weights, "propagate", str(EXAMPLE_CT), "--structure", "bladder", "--drawn", drawn,
               "--ends", "drawn", "--out", str(out)) == 0
    return out


def corrected_copy(propagated, tmp_path, reference, small_weights, k: int, contour: np.ndarray, *extra: str):
    bladder, labels, _ = reference
    result = tmp_path / "result"
    shutil.copytree(propagated, result)
    correction = np.zeros_like(bladder)
    correction[k] = contour
    path = write_mask(correction, labels, tmp_path / "correction.nii.gz")
    code = cli(small_weights, "refine", str(result), "--ct", str(EXAMPLE_CT), "--structure", "bladder",
               "--drawn", path, "--slices", str(k), "--ends", "drawn", *extra)
    return code, result


def test_propagate_records_version_zero(propagated, reference):
    _, _, slices = reference
    version = json.loads((propagated / "versions" / "bladder" / "v0.json").read_text())
    assert version["version"] == 0 and version["kind"] == "propagate" and version["drawn_slices"] == slices
    assert np.array_equal(read(propagated / "versions" / "bladder" / "v0.nii.gz"), read(propagated / "bladder.nii.gz"))
    assert [version["provenance"][k] for k in slices] == ["drawn"] * 3


def test_a_correction_is_exact_local_and_a_new_version(propagated, reference, small_weights, tmp_path):
    bladder, _, slices = reference
    k = slices[0] + 2  # between the first two drawn slices
    code, result = corrected_copy(propagated, tmp_path, reference, small_weights, k, bladder[k])
    assert code == 0
    before, after = read(result / "versions" / "bladder" / "v0.nii.gz"), read(result / "bladder.nii.gz")
    assert np.array_equal(after[k], bladder[k])
    assert np.array_equal(after[slices], before[slices])  # drawn slices stay as drawn
    assert np.array_equal(after[slices[1]:], before[slices[1]:])  # beyond the next drawn slice: untouched
    version = json.loads((result / "versions" / "bladder" / "v1.json").read_text())
    assert version["kind"] == "refine" and version["based_on"] == 0 and version["corrected_slices"] == [k]
    assert version["drawn_slices"] == sorted(slices + [k])
    assert set(version["changed_slices"]) <= set(range(slices[0] + 1, slices[1]))
    summary = json.loads((result / "summary.json").read_text())
    assert summary["versions"]["bladder"]["version"] == 1


def test_a_listed_empty_slice_erases_it(propagated, reference, small_weights, tmp_path):
    bladder, _, slices = reference
    k = slices[2] - 1
    code, result = corrected_copy(propagated, tmp_path, reference, small_weights, k, np.zeros_like(bladder[k]))
    assert code == 0
    after = read(result / "bladder.nii.gz")
    assert not after[k].any() and np.array_equal(after[slices[2]], bladder[slices[2]])
    version = json.loads((result / "versions" / "bladder" / "v1.json").read_text())
    assert version["provenance"][k] == "drawn"


def test_refine_a_segment_draft_registers_it_as_version_zero(small_weights, reference, tmp_path):
    bladder, labels, _ = reference
    out = tmp_path / "draft"
    assert cli(small_weights, "segment", str(EXAMPLE_CT), "--out", str(out), "--structures", "bladder",
               "--no-preview") == 0
    draft = read(out / "bladder.nii.gz")
    ks = np.nonzero(bladder.any(axis=(1, 2)))[0]
    k = int(ks[len(ks) // 2])
    correction = np.zeros_like(bladder)
    correction[k] = bladder[k]
    path = write_mask(correction, labels, tmp_path / "correction.nii.gz")
    assert cli(small_weights, "refine", str(out), "--ct", str(EXAMPLE_CT), "--structure", "bladder", "--drawn",
               path) == 0
    v0 = json.loads((out / "versions" / "bladder" / "v0.json").read_text())
    assert v0["kind"] == "draft" and v0["drawn_slices"] == []
    assert np.array_equal(read(out / "versions" / "bladder" / "v0.nii.gz"), draft)
    after = read(out / "bladder.nii.gz")
    assert np.array_equal(after[k], bladder[k])
    window = int(np.ceil(20.0 / sitk.ReadImage(str(EXAMPLE_CT)).GetSpacing()[2])) + 1
    far = [z for z in range(len(after)) if abs(z - k) > window]
    assert np.array_equal(after[far], draft[far])  # a correction of a draft reaches at most its window


@pytest.fixture(scope="module")
def dicom_case(reference, tmp_path_factory):
    """The example CT as a DICOM series, and an RTSTRUCT (the project's own writer) with the bladder on three
    slices only: a planning system's partial contour."""
    bladder, _, slices = reference
    folder = tmp_path_factory.mktemp("dicom")
    series_folder = write_ct_series(EXAMPLE_CT, folder / "ct")
    series = read_series(series_folder)
    on_series = np.zeros(series.image.GetSize()[::-1], dtype=bool)
    canonical_labels = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(EXAMPLE_LABELS)), "LPS"))
    ks = np.nonzero((canonical_labels == BLADDER).any(axis=(1, 2)))[0]
    chosen = [int(ks[2]), int(ks[len(ks) // 2]), int(ks[-3])]
    on_series[chosen] = (canonical_labels == BLADDER)[chosen]
    bladder_definition = default_definition("bladder")
    rtstruct = write_rtstruct(series, {"bladder": on_series}, folder / "RS.dcm", {}, {"bladder": bladder_definition})
    return series_folder, rtstruct, chosen


def test_an_rtstruct_on_three_slices_is_a_drawing(dicom_case, small_weights, tmp_path):
    series_folder, rtstruct, chosen = dicom_case
    out = tmp_path / "out"
    assert cli(small_weights, "propagate", str(series_folder), "--structure", "bladder", "--drawn", str(rtstruct),
               "--roi", "BLADDER", "--ends", "drawn", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["input_slice"] for s in summary["drawn_slices"]] == chosen
    drawn, _ = rtstruct_mask(rtstruct, read_series(series_folder).image, ["bladder"])
    result = read(out / "bladder.nii.gz")
    assert np.array_equal(result[chosen], sitk.GetArrayFromImage(drawn)[chosen] != 0)


@pytest.mark.parametrize("case", ["no result folder", "dicom without roi", "unknown roi", "no ct copy"])
def test_bad_edits_are_one_line_exit_2(case, dicom_case, propagated, small_weights, tmp_path, capsys):
    series_folder, rtstruct, _ = dicom_case
    args, words = {
        "no result folder": (["refine", str(tmp_path / "nowhere"), "--ct", str(EXAMPLE_CT), "--structure", "bladder",
                              "--drawn", str(rtstruct), "--roi", "bladder"], "result folder not found"),
        "dicom without roi": (["propagate", str(series_folder), "--structure", "bladder", "--drawn", str(rtstruct),
                               "--out", str(tmp_path / "o")], "--roi"),
        "unknown roi": (["propagate", str(series_folder), "--structure", "bladder", "--drawn", str(rtstruct),
                         "--roi", "rectum", "--out", str(tmp_path / "o")], "no ROI named 'rectum'"),
        "no ct copy": (["refine", str(propagated), "--structure", "bladder", "--drawn", str(rtstruct),
                        "--roi", "bladder"], "give it with --ct"),
    }[case]
    assert cli(small_weights, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
