"""Every edit of a structure is a version: numbered, kept, never overwritten.

A result folder (of `segment` or `propagate`, on the CLI or a server job) keeps
each structure's versions under `versions/<structure>/`: `v<N>.nii.gz` (the mask
on the input's grid) and `v<N>.json` (what the edit was). A version exists once
its JSON does (written last, created exclusively, so two edits racing for one
number cannot both win). Version 0 of a segmented structure is the draft as
`segment` wrote it, registered the first time the structure is edited. The
result's top-level `<structure>.nii.gz` is a copy of the newest version (or of
the approved one, once a result is approved: later edits stay in versions/
until the next approval), so everything that reads a result reads the edited
(or approved) contour. A structure the result did not segment (drawn and propagated) keeps how it is
shown, its display name and colour as the reviewer chose them, in `versions/<structure>/definition.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from autocontour.catalogue import StructureDefinition
from autocontour.export import SUMMARY, mask_file

VERSIONS = "versions"
DEFINITION = "definition.json"
Kind = Literal["draft", "propagate", "refine", "revert"]
PROVENANCE_NAMES = {0: "none", 1: "drawn", 2: "propagated", 3: "draft"}


class Version(BaseModel):
    """One version of one structure. Slice numbers count along the input file's third axis from 0."""

    version: int = Field(description="0: the first (segment's draft, or the first propagation), then 1, 2, ... "
                                      "in the order edits arrived")
    kind: Kind = Field(description="draft: segment's result; propagate: from drawn slices only; refine: "
                                   "corrections on an earlier version; revert: a copy of version `based_on` "
                                   "(an undo)")
    based_on: int | None = Field(None, description="the version this edit corrected (revert: the one it copies)")
    created: str = Field(description="ISO 8601 time, UTC")
    author: str | None = Field(None, description="the API key's name that made the edit (None: the CLI)")
    drawn_slices: list[int] = Field(description="slices that are a clinician's drawing, exactly as drawn")
    corrected_slices: list[int] = Field(default_factory=list, description="slices this edit drew or corrected")
    changed_slices: list[int] = Field(default_factory=list, description="slices whose contour differs from "
                                                                        "`based_on`")
    next_slice: int | None = Field(None, description="where a correction would help most next")
    volume_ml: float
    seconds: float = Field(0.0, description="time the edit took to compute")
    provenance: list[str] = Field(description="per slice: drawn, propagated, draft or none")


def version_mask_file(n: int) -> str:
    return f"v{n}.nii.gz"


class StructureVersions:
    """The versions of one structure in one result folder."""

    def __init__(self, result_dir: Path, structure: str):
        self.result_dir, self.structure = Path(result_dir), structure
        self.folder = self.result_dir / VERSIONS / structure

    def all(self) -> list[Version]:
        found = sorted(self.folder.glob("v*.json"), key=lambda p: int(p.stem[1:]))
        return [Version.model_validate_json(p.read_text()) for p in found]

    def latest(self) -> Version | None:
        versions = self.all()
        return versions[-1] if versions else None

    def get(self, n: int) -> Version:
        path = self.folder / f"v{n}.json"
        if not path.is_file():
            raise LookupError(f"{self.structure} has no version {n}")
        return Version.model_validate_json(path.read_text())

    def mask_path(self, n: int) -> Path:
        return self.folder / version_mask_file(n)

    def read_mask(self, n: int) -> sitk.Image:
        return sitk.ReadImage(str(self.mask_path(n)))

    def add(self, mask: sitk.Image, version: Version) -> Version:
        """Store a new version (its number must be the next free one) and make it the top-level mask."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".v{version.version}.{os.getpid()}.nii.gz"
        sitk.WriteImage(mask, str(staging), useCompression=True)
        try:
            with open(self.folder / f"v{version.version}.json", "x") as out:
                out.write(version.model_dump_json(indent=1) + "\n")
        except FileExistsError:
            staging.unlink()
            raise
        staging.replace(self.mask_path(version.version))
        if approval_of(self.result_dir) is None:  # an approved result's files stay what was approved
            self.publish(version.version)
        return version

    def publish(self, n: int) -> None:
        """Make version `n` the result's top-level mask (what downloads and the zip hold)."""
        top = self.result_dir / mask_file(self.structure)
        staging = top.with_name(f".{top.name}.{os.getpid()}")
        shutil.copyfile(self.mask_path(n), staging)
        staging.replace(top)


def drawn_definition(result_dir: Path, structure: str) -> StructureDefinition | None:
    """The definition a reviewer gave a structure the result did not segment; None when none was given."""
    path = Path(result_dir) / VERSIONS / structure / DEFINITION
    return StructureDefinition.model_validate_json(path.read_text()) if path.is_file() else None


def save_drawn_definition(result_dir: Path, definition: StructureDefinition) -> None:
    """Keep a drawn structure's definition beside its versions, for the RTSTRUCT and SEG written at approval."""
    folder = Path(result_dir) / VERSIONS / definition.name
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".{DEFINITION}.{os.getpid()}"
    staging.write_text(definition.model_dump_json(indent=1) + "\n")
    staging.replace(folder / DEFINITION)


def revert(result_dir: Path, structure: str, n: int, author: str | None) -> Version:
    """Make version `n` the newest again, as a new version that copies it (an undo that overwrites nothing);
    its drawn slices and provenance come along, so the next correction refines what was reverted to."""
    store = StructureVersions(result_dir, structure)
    latest = store.latest()
    if latest is None:
        raise LookupError(f"{structure} has no versions")
    target, mask = store.get(n), store.read_mask(n)
    version = target.model_copy(update={
        "version": latest.version + 1, "kind": "revert", "based_on": n, "created": now_iso(), "author": author,
        "corrected_slices": [], "changed_slices": changed_slices(store.read_mask(latest.version), mask),
        "seconds": 0.0})
    return store.add(mask, version)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def changed_slices(before: sitk.Image | None, after: sitk.Image) -> list[int]:
    """Input k slices whose contour differs (all slices holding anything when there is no `before`)."""
    new = sitk.GetArrayViewFromImage(after) != 0
    old = np.zeros_like(new) if before is None else sitk.GetArrayViewFromImage(before) != 0
    return [int(k) for k in np.nonzero((old != new).any(axis=(1, 2)))[0]]


def approval_of(result_dir: Path) -> dict | None:
    """summary.json's `approval` entry (who approved which versions, when); None before any approval."""
    path = Path(result_dir) / SUMMARY
    return json.loads(path.read_text()).get("approval") if path.is_file() else None


def versions_of(result_dir: Path) -> dict[str, list[Version]]:
    """Every edited structure's versions in a result folder."""
    root = Path(result_dir) / VERSIONS
    if not root.is_dir():
        return {}
    return {p.name: StructureVersions(result_dir, p.name).all() for p in sorted(root.iterdir()) if p.is_dir()}


def note_in_summary(result_dir: Path, structure: str, version: Version) -> None:
    """summary.json names each edited structure's newest version (versions/ holds them all)."""
    path = Path(result_dir) / SUMMARY
    summary = json.loads(path.read_text()) if path.is_file() else {}
    brief = version.model_dump(exclude={"provenance"})
    summary.setdefault("versions", {})[structure] = brief
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(summary, indent=1) + "\n")
    staging.replace(path)
