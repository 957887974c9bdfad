"""`autocontour propagate` (issue 30): the example pelvis CT's bladder drawn on three slices, a small seeded
network. The network's quality does not matter here, only the contract: the mask on the CT's grid, the drawn
slices exactly as drawn, honest provenance in both slice numberings, bounded ends, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.cli import main
from autocontour.io import CanonicalCT, read_ct
from autocontour.pipeline.propagation import SliceMap
from autocontour.pipeline.summary import DRAFT_DISCLAIMER
from tests.conftest import EXAMPLE_CT, EXAMPLE_LABELS

BLADDER = 104  # examples/pelvis_ct/labels.json


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> tuple[str, list[int], sitk.Image]:
    """The bladder on three of its slices (input k), the rest of the mask empty."""
    labels = sitk.ReadImage(str(EXAMPLE_LABELS))
    bladder = sitk.GetArrayFromImage(labels) == BLADDER  # (k, j, i)
    ks = np.nonzero(bladder.any(axis=(1, 2)))[0]
    middle = (int(ks.min()) + int(ks.max())) // 2
    slices = [middle - 4, middle, middle + 4]
    only = np.zeros_like(bladder, dtype=np.uint8)
    only[slices] = bladder[slices]
    image = sitk.GetImageFromArray(only)
    image.CopyInformation(labels)
    path = tmp_path_factory.mktemp("drawn") / "drawn.nii.gz"
    sitk.WriteImage(image, str(path))
    return str(path), slices, image


def run(small_weights, drawn_path: str, out, *extra: str) -> int:
    return main(["propagate", str(EXAMPLE_CT), "--structure", "bladder", "--drawn", drawn_path, "--out", str(out),
                 "--weights", str(small_weights), "--device", "cpu", "--quiet", *extra])


@pytest.fixture(scope="module")
def outputs(small_weights, drawn, tmp_path_factory) -> dict[str, tuple[sitk.Image, dict]]:
    path, _, _ = drawn
    result = {}
    for ends in ("continue", "drawn"):
        out = tmp_path_factory.mktemp(f"propagate_{ends}")
        assert run(small_weights, path, out, "--ends", ends) == 0
        result[ends] = (sitk.ReadImage(str(out / "bladder.nii.gz")), json.loads((out / "summary.json").read_text()))
    return result


@pytest.mark.parametrize("ends", ["continue", "drawn"])
def test_mask_on_the_ct_grid_with_drawn_slices_exactly_as_drawn(outputs, drawn, ends):
    mask, summary = outputs[ends]
    _, slices, image = drawn
    ct = sitk.ReadImage(str(EXAMPLE_CT))
    assert mask.GetSize() == ct.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
    assert np.allclose(mask.GetOrigin(), ct.GetOrigin()) and np.allclose(mask.GetDirection(), ct.GetDirection())
    out, given = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(image)
    assert np.array_equal(out[slices], given[slices])
    assert [s["input_slice"] for s in summary["drawn_slices"]] == slices
    assert all(s["provenance"] == "drawn" for s in summary["drawn_slices"])
    assert summary["disclaimer"] == DRAFT_DISCLAIMER and summary["structure"] == "bladder"
    assert summary["volume_ml"] > 0 and summary["model"]["name"] == "test-small" and summary["model"]["sha256"]
    assert "ct.nii.gz" not in json.dumps(summary) and "drawn.nii.gz" not in json.dumps(summary)


@pytest.mark.parametrize("ends", ["continue", "drawn"])
def test_summary_names_every_filled_slice_in_both_numberings(outputs, ends):
    mask, summary = outputs[ends]
    filled = set(np.nonzero(sitk.GetArrayFromImage(mask).any(axis=(1, 2)))[0].tolist())
    named = {s["input_slice"] for s in summary["slices"]}
    assert filled <= named
    slice_map = SliceMap.of(CanonicalCT(read_ct(EXAMPLE_CT)))
    for s in summary["slices"] + summary["ends"]:
        assert slice_map.canonical(s["input_slice"]) == s["canonical_slice"]
    propagated = {s["input_slice"] for s in summary["propagated_slices"]}
    assert propagated.isdisjoint({s["input_slice"] for s in summary["drawn_slices"]})
    if summary["next_slice"] is not None:
        assert summary["next_slice"]["input_slice"] in propagated and summary["next_slice"]["rule"] == "bridge"


def test_ends_drawn_leaves_nothing_beyond_the_drawn_ends(outputs, drawn):
    mask, summary = outputs["drawn"]
    _, slices, _ = drawn
    filled = np.nonzero(sitk.GetArrayFromImage(mask).any(axis=(1, 2)))[0]
    assert filled.min() >= slices[0] and filled.max() <= slices[-1]
    assert {e["reason"] for e in summary["ends"]} == {"drawn"}
    assert {s["input_slice"] for s in summary["propagated_slices"]} <= set(range(slices[0], slices[-1] + 1))


def test_continue_says_where_each_end_stopped_and_why(outputs):
    _, summary = outputs["continue"]
    assert summary["ends_option"] == "continue"
    assert [e["side"] for e in summary["ends"]] == ["inferior", "superior"]
    assert all(e["reason"] in {"drawn", "structure ended", "limit", "scan edge"} for e in summary["ends"])


def test_slices_subset_is_honoured(small_weights, drawn, tmp_path, capsys):
    path, slices, image = drawn
    assert main(["propagate", str(EXAMPLE_CT), "--structure", "bladder", "--drawn", path, "--out", str(tmp_path),
                 "--weights", str(small_weights), "--device", "cpu", "--ends", "drawn",
                 "--slices", f"{slices[0]},{slices[2]}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["input_slice"] for s in summary["drawn_slices"]] == [slices[0], slices[2]]
    assert slices[1] in {s["input_slice"] for s in summary["propagated_slices"]}
    printed = capsys.readouterr().out
    assert "DRAFT" in printed and "draw next" in printed and "inferior end" in printed


def test_slice_map_matches_canonical_orientation():
    """A file whose k runs superior-to-inferior maps k to the canonical slice counted from the other end."""
    ct = read_ct(EXAMPLE_CT)
    flipped = sitk.Flip(ct, [False, False, True])
    for image in (ct, flipped):
        canonical = CanonicalCT(image)
        index = sitk.GetImageFromArray(np.broadcast_to(np.arange(image.GetSize()[2])[:, None, None],
                                                       image.GetSize()[::-1]).astype(np.int16).copy())
        index.CopyInformation(image)
        by_z = canonical.to_canonical(index)[:, 0, 0]
        slice_map = SliceMap.of(canonical)
        assert [slice_map.input(z) for z in range(len(by_z))] == by_z.tolist()
        assert all(slice_map.canonical(int(k)) == z for z, k in enumerate(by_z))


def _write(tmp_path, array: np.ndarray, like: sitk.Image, name: str, **geometry) -> str:
    """A mask with `like`'s geometry but for the `geometry` given (Spacing=..., Origin=..., Direction=...)."""
    image = sitk.GetImageFromArray(array)
    for key in ("Spacing", "Origin", "Direction"):
        getattr(image, f"Set{key}")(geometry.get(key, getattr(like, f"Get{key}")()))
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return str(path)


def bad_inputs(drawn, tmp_path) -> dict[str, tuple[list[str], str]]:
    path, slices, image = drawn
    given = sitk.GetArrayFromImage(image)
    empty = np.nonzero(~given.any(axis=(1, 2)))[0]
    origin = list(image.GetOrigin())
    origin[0] += 5.0
    return {
        "out of range": (["--drawn", path, "--slices", f"{slices[0]},{given.shape[0]}"], "outside the scan"),
        "empty listed slice": (["--drawn", path, "--slices", f"{slices[0]},{int(empty[0])}"], "holds nothing"),
        "empty mask": (["--drawn", _write(tmp_path, np.zeros_like(given), image, "empty.nii.gz")], "empty"),
        "bad name": (["--drawn", path, "--structure", "Bad-Name!"], "invalid structure name"),
        "two names": (["--drawn", path, "--structure", "bladder,rectum"], "one structure"),
        "other size": (["--drawn", _write(tmp_path, given[:-1], image, "small.nii.gz")], "size"),
        "other origin": (["--drawn", _write(tmp_path, given, image, "moved.nii.gz", Origin=origin)], "origin"),
        "bad slice list": (["--drawn", path, "--slices", "a,b"], "slice numbers"),
        "sagittal k": _sagittal(tmp_path, image),
    }


def _sagittal(tmp_path, drawn: sitk.Image) -> tuple[list[str], str]:
    """The CT and the mask stored with the left-right axis third: k slices are not axial slices."""
    ct = sitk.PermuteAxes(sitk.ReadImage(str(EXAMPLE_CT)), [1, 2, 0])
    sitk.WriteImage(ct, str(tmp_path / "sagittal_ct.nii.gz"))
    sitk.WriteImage(sitk.PermuteAxes(drawn, [1, 2, 0]), str(tmp_path / "sagittal_drawn.nii.gz"))
    return [str(tmp_path / "sagittal_ct.nii.gz"), "--drawn", str(tmp_path / "sagittal_drawn.nii.gz")], "not axial"


@pytest.mark.parametrize("case", ["out of range", "empty listed slice", "empty mask", "bad name", "two names",
                                  "other size", "other origin", "bad slice list", "sagittal k"])
def test_bad_input_exits_2_with_one_line(small_weights, drawn, tmp_path, capsys, case):
    extra, expected = bad_inputs(drawn, tmp_path)[case]
    ct = [] if case == "sagittal k" else [str(EXAMPLE_CT)]  # that case names its own CT
    args = ["propagate", *ct, "--structure", "bladder", "--out", str(tmp_path / "out"),
            "--weights", str(small_weights), "--device", "cpu", "--quiet", *extra]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def _flipped_case(folder, labels: sitk.Image) -> tuple[str, sitk.Image]:
    """The example CT and its labels stored with k running from superior to inferior."""
    ct = sitk.Flip(sitk.ReadImage(str(EXAMPLE_CT)), [False, False, True])
    sitk.WriteImage(ct, str(folder / "flipped_ct.nii.gz"))
    return str(folder / "flipped_ct.nii.gz"), sitk.Flip(labels, [False, False, True])


def _dicom_case(folder, labels: sitk.Image) -> tuple[str, sitk.Image]:
    """The example CT as a DICOM series; the labels on the grid the series is read onto."""
    from autocontour.config import Settings
    from autocontour.dicom.reading import read_input
    from tests.dicom_tools import write_ct_series

    series = write_ct_series(EXAMPLE_CT, folder / "series")
    image, _ = read_input(series, Settings())
    return str(series), sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())


@pytest.mark.parametrize("storage", ["flipped", "dicom"])
def test_slices_count_along_the_input_as_stored(small_weights, tmp_path, storage):
    """--slices are the input's own k indices whichever way it runs; the drawn ones come back in place, and
    a DICOM input's patient identifiers stay out of the summary."""
    labels = sitk.ReadImage(str(EXAMPLE_LABELS))
    ct_path, stored = (_flipped_case if storage == "flipped" else _dicom_case)(tmp_path, labels)
    bladder = (sitk.GetArrayFromImage(stored) == BLADDER).astype(np.uint8)
    ks = np.nonzero(bladder.any(axis=(1, 2)))[0]
    slices = [int(ks.min()) + 3, (int(ks.min()) + int(ks.max())) // 2, int(ks.max()) - 3]
    image = sitk.GetImageFromArray(bladder)
    image.CopyInformation(stored)
    sitk.WriteImage(image, str(tmp_path / "drawn.nii.gz"))
    out = tmp_path / "out"
    assert main(["propagate", ct_path, "--structure", "bladder", "--drawn", str(tmp_path / "drawn.nii.gz"),
                 "--slices", ",".join(map(str, slices)), "--ends", "drawn", "--out", str(out),
                 "--weights", str(small_weights), "--device", "cpu", "--quiet"]) == 0
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "bladder.nii.gz")))
    assert result.shape == bladder.shape and np.array_equal(result[slices], bladder[slices])
    filled = np.nonzero(result.any(axis=(1, 2)))[0]
    assert filled.min() >= slices[0] and filled.max() <= slices[-1]
    text = (out / "summary.json").read_text()
    summary = json.loads(text)
    listed = summary["drawn_slices"]  # inferior first
    expected = [len(bladder) - 1 - k for k in slices] if storage == "flipped" else slices
    assert [s["canonical_slice"] for s in listed] == sorted(expected)
    assert sorted(s["input_slice"] for s in listed) == slices
    assert "Yamada" not in text and "AC-0042" not in text
