"""Support sets take only the right patient's contours, and a set edited after it was built is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import RECIPES
from pydicom.uid import generate_uid
from safetensors.numpy import load_file

from autocontour.catalogue import BUILTIN
from autocontour.cli import main
from autocontour.dicom.outputs import write_rtstruct
from autocontour.dicom.series import read_series
from autocontour.errors import SupportSetError
from autocontour.support.build import build_support_set
from autocontour.support.recipes import load_recipes
from autocontour.support.store import MANIFEST, TENSORS, SupportManifest, content_hash, load_support_set

SERIES = Path(__file__).resolve().parent / "data" / "dicom_ct"  # 20 slices, 2 mm apart


@pytest.fixture(scope="module")
def contoured_case(tmp_path_factory) -> tuple[Path, Path]:
    """The 20-slice series' own contours of a blob: its RTSTRUCT (the project's writer) and the NIfTI mask."""
    folder = tmp_path_factory.mktemp("case")
    series = read_series(SERIES)
    z, y, x = np.ogrid[:20, :512, :512]
    blob = ((y - 250) / 70.0) ** 2 + ((x - 300) / 55.0) ** 2 + ((z - 9) / 7.0) ** 2 <= 1
    mask = sitk.GetImageFromArray(blob.astype(np.uint8))
    mask.CopyInformation(series.image)
    sitk.WriteImage(mask, str(folder / "mask.nii.gz"))
    return write_rtstruct(series, {"bladder": blob}, folder / "rtstruct.dcm", {}, BUILTIN,
                          approved_by="Reviewer^Test"), folder / "mask.nii.gz"


def assert_build_refuses(mask: Path, words: str, out: Path, capsys) -> None:
    """`autocontour support build` on the series with this mask: exit 2, one line naming the words, no set."""
    code = main(["support", "build", "bladder", "--case", str(SERIES), str(mask), "--roi", "bladder", "--size", "8",
                 "--symmetric", "--no-atlas", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("autocontour: error: case case0: "), err
    assert words in err, err
    assert not (out / MANIFEST).exists()


def edited_rtstruct(source: Path, target: Path, edit: Callable[[pydicom.Dataset], None]) -> Path:
    ds = pydicom.dcmread(source)
    edit(ds)
    ds.save_as(target)
    return target


def _contours(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(ds.ROIContourSequence[0].ContourSequence)


def _another_scan(ds: pydicom.Dataset) -> None:
    """The same contours 40 mm to the left, on the Frame of Reference of another scan."""
    frame = generate_uid()
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = frame
    ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = frame
    for contour in _contours(ds):
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + (40, 0, 0)
        contour.ContourData = [f"{v:.3f}" for v in points.ravel()]


def _another_series(ds: pydicom.Dataset) -> None:
    """The Frame of Reference kept, the contours' images another series' (a re-export under new UIDs, say)."""
    for contour in _contours(ds):
        for image in contour.ContourImageSequence:
            image.ReferencedSOPInstanceUID = generate_uid()


def _between_slices(ds: pydicom.Dataset) -> None:
    """Every contour half a slice (1 mm) up: exactly between two slices."""
    for contour in _contours(ds):
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) + (0, 0, 1.0)
        contour.ContourData = [f"{v:.3f}" for v in points.ravel()]


def _nan(ds: pydicom.Dataset) -> None:
    contour = _contours(ds)[3]
    contour.ContourData = ["NaN", *list(contour.ContourData)[1:]]


RTSTRUCT_EDITS = {
    "another Frame of Reference": (_another_scan, "ROI 'Bladder' lies on another Frame of Reference than the CT "
                                                  "series"),
    "another series' images": (_another_series, "references 15 image(s) that are not in the CT series"),
    "between slices": (_between_slices, "a contour lies 1.00 mm from the nearest CT slice"),
    "NaN": (_nan, "a contour's ContourData holds a value that is not a finite number (NaN or infinite)"),
}


@pytest.mark.parametrize("kind", RTSTRUCT_EDITS)
def test_an_rtstruct_of_another_scan_or_off_its_slices_is_refused(contoured_case, tmp_path, capsys, kind):
    edit, words = RTSTRUCT_EDITS[kind]
    rtstruct = edited_rtstruct(contoured_case[0], tmp_path / "rtstruct.dcm", edit)
    assert_build_refuses(rtstruct, words, tmp_path / "set", capsys)


def test_the_series_own_rtstruct_and_mask_build(contoured_case, tmp_path):
    """The refusals above come from the edits: the case as written builds, from the RTSTRUCT and from the mask."""
    for i, mask in enumerate(contoured_case):
        build = ["support", "build", "bladder", "--case", str(SERIES), str(mask), "--roi", "bladder", "--size", "8",
                 "--symmetric", "--no-atlas", "--out", str(tmp_path / f"set{i}")]
        assert main(build) == 0
        assert load_support_set(tmp_path / f"set{i}").manifest.source_cases[0].extent_slices == [3, 15]


def test_a_mask_flipped_on_the_same_grid_is_refused(contoured_case, tmp_path, capsys):
    """Same size, spacing and origin, the x axis reversed: its structure would land mirrored."""
    mask = sitk.ReadImage(str(contoured_case[1]))
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1
    mask.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(mask, str(tmp_path / "flipped.nii.gz"))
    assert_build_refuses(tmp_path / "flipped.nii.gz", "the mask's grid differs from the CT's: direction (-1.0,",
                         tmp_path / "set", capsys)


@pytest.fixture(scope="module")
def built_set(tmp_path_factory, phantom_cases) -> Path:
    """A format-2 set (atlas copies, crops, a recipe) from one phantom, with a warning (it asks for more slices
    than the phantom has)."""
    folder = tmp_path_factory.mktemp("built") / "bladder"
    build_support_set("bladder", "bladder", phantom_cases[:1], folder, size=200,
                      recipe=load_recipes(RECIPES)["bladder"], preview=False)
    return folder


def edited_copy(built: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the set whose manifest has `edit` applied."""
    folder = target / "set"
    shutil.copytree(built, folder, symlinks=True)
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def forged_atlas_folder(built: Path, target: Path, atlas_folder: str) -> Path:
    """A copy of the set whose first atlas folder is `atlas_folder`, with the hash recomputed as a forger would."""
    folder = target / "set"
    shutil.copytree(built, folder)
    manifest = SupportManifest.model_validate_json((folder / MANIFEST).read_text())
    atlas = manifest.source_cases[0].atlas
    assert atlas is not None
    atlas.folder = atlas_folder  # assignment is not validated: the forger's own script
    tensors = load_file(str(folder / TENSORS))
    manifest.content_hash = content_hash(manifest, tensors["images"], tensors["labels"],
                                         (tensors["crop_images"], tensors["crop_labels"]))
    (folder / MANIFEST).write_text(manifest.model_dump_json())
    return folder


def assert_list_refuses(folder: Path, words: str, capsys) -> None:
    """`autocontour support list` refuses the set with exit 2 and one line naming it and the words."""
    code = main(["support", "list", "--support-dir", str(folder), "--no-shipped-support"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("autocontour: error: "), err
    assert str(folder) in err and words in err, err


def _case(manifest: dict) -> dict:
    return manifest["source_cases"][0]


MANIFEST_EDITS: dict[str, Callable[[dict], None]] = {
    "name": lambda m: m.update(name="bladder_clinic"),
    "fingerprint": lambda m: _case(m).update(fingerprint="0" * 64),
    "extent_slices": lambda m: _case(m).update(extent_slices=[_case(m)["extent_slices"][0] + 1,
                                                              _case(m)["extent_slices"][1]]),
    "atlas.spacing_mm": lambda m: _case(m)["atlas"].update(spacing_mm=_case(m)["atlas"]["spacing_mm"] + 1),
    "symmetric": lambda m: m.update(symmetric=not m["symmetric"]),
    "recipe": lambda m: m.update(recipe=None),
    "warnings": lambda m: m.update(warnings=[]),
    "label": lambda m: _case(m).update(label="label 104"),
    "source": lambda m: m.update(source="another hospital"),
    "version": lambda m: m.update(version="2"),
    "definition.colour": lambda m: m["definition"].update(colour=[0, 0, 255]),
}


def test_the_built_set_loads_and_has_every_edited_field(built_set):
    support = load_support_set(built_set)
    manifest = support.manifest
    assert manifest.recipe and manifest.warnings and manifest.crop and manifest.source_cases[0].atlas
    assert support.id.startswith("bladder-")


@pytest.mark.parametrize("field", MANIFEST_EDITS)
def test_each_manifest_edit_is_refused(built_set, tmp_path, capsys, field):
    folder = edited_copy(built_set, tmp_path, MANIFEST_EDITS[field])
    with pytest.raises(SupportSetError, match="content hash mismatch"):
        load_support_set(folder)
    assert_list_refuses(folder, "the set was modified after it was built", capsys)


def test_the_build_date_alone_may_change(built_set, tmp_path):
    """The date is the one field outside the hash, so that a rebuild from the same cases keeps its id."""
    folder = edited_copy(built_set, tmp_path, lambda m: m.update(created="2001-01-01T00:00:00+00:00"))
    assert load_support_set(folder).id == load_support_set(built_set).id


def test_an_atlas_folder_outside_the_set_is_refused(built_set, tmp_path, capsys):
    outside = tmp_path / "outside_atlas"
    shutil.copytree(built_set / "atlas" / "case0", outside)  # the same files: only the place is wrong

    folder = forged_atlas_folder(built_set, tmp_path / "a", "../../outside_atlas")
    assert_list_refuses(folder, "atlas folder '../../outside_atlas' leaves the support set's folder", capsys)
    folder = forged_atlas_folder(built_set, tmp_path / "b", str(outside))
    assert_list_refuses(folder, f"atlas folder {str(outside)!r} leaves the support set's folder", capsys)


@pytest.mark.parametrize("linked", ["atlas/case0", "atlas/case0/atlas_ct.nii.gz"])
def test_a_symbolic_link_out_of_the_set_is_refused(built_set, tmp_path, capsys, linked):
    """The manifest is untouched (its hash holds) and the files are the same: only where they lie is wrong."""
    folder = edited_copy(built_set, tmp_path, lambda m: None)
    outside = tmp_path / "outside"
    shutil.move(folder / linked, outside)
    (folder / linked).symlink_to(outside)
    with pytest.raises(SupportSetError, match="leads outside the support set's folder"):
        load_support_set(folder)
    assert_list_refuses(folder, "leads outside the support set's folder", capsys)
