"""Support sets take only the right patient's contours, and a set edited after it was built is refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import RECIPES
from safetensors.numpy import load_file

from autocontour.cli import main
from autocontour.errors import SupportSetError
from autocontour.support.build import build_support_set
from autocontour.support.recipes import load_recipes
from autocontour.support.store import MANIFEST, TENSORS, SupportManifest, content_hash, load_support_set


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
