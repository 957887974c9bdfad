"""Edit one structure of a result: propagate it from drawn slices, or correct slices of its newest version.

Shared by `autocontour refine`, `autocontour propagate` and the server's propagate endpoint, so a version
made anywhere is read the same way everywhere. The first edit of a structure that `segment` drew registers
segment's mask as version 0 (every slice of it a draft); a structure the result does not hold starts from
the drawn slices alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autocontour.engine.propagation import DRAWN, Propagation, PropagationOptions, propagate
from autocontour.engine.refinement import DRAFT, Correction, refine
from autocontour.engine.runner import Engine
from autocontour.export import mask_file
from autocontour.pipeline.propagation import NEXT_RULE, DrawnCase, SliceMap
from autocontour.pipeline.versions import (
    PROVENANCE_NAMES,
    StructureVersions,
    Version,
    changed_slices,
    now_iso,
)

PROVENANCE_CODES = {name: code for code, name in PROVENANCE_NAMES.items()}


@dataclass(frozen=True)
class Edit:
    """What a clinician drew on one structure: the mask on the CT's grid and the slices it holds."""

    structure: str
    case: DrawnCase  # the CT and the drawn slices, checked
    ends_drawn: bool = False
    author: str | None = None


def current_version(result_dir: Path, structure: str) -> Version | None:
    """The structure's newest version, registering segment's draft as version 0 on first use."""
    versions = StructureVersions(result_dir, structure)
    latest = versions.latest()
    draft = Path(result_dir) / mask_file(structure)
    if latest is not None or not draft.is_file():
        return latest
    mask = sitk.ReadImage(str(draft))
    filled = (sitk.GetArrayViewFromImage(mask) != 0).any(axis=(1, 2))
    spacing = mask.GetSpacing()
    version = Version(version=0, kind="draft", created=now_iso(), drawn_slices=[],
                      volume_ml=_volume_ml(mask, spacing),
                      provenance=[PROVENANCE_NAMES[DRAFT if f else 0] for f in filled])
    try:
        return versions.add(mask, version)
    except FileExistsError:  # another edit registered it first
        return versions.latest()


def _volume_ml(mask: sitk.Image, spacing: tuple[float, ...]) -> float:
    return round(float((sitk.GetArrayViewFromImage(mask) != 0).sum()) * float(np.prod(spacing)) / 1000.0, 3)


def _canonical_provenance(version: Version, slice_map: SliceMap) -> np.ndarray:
    codes = np.zeros(slice_map.size, dtype=np.uint8)
    for k, name in enumerate(version.provenance):
        codes[slice_map.canonical(k)] = PROVENANCE_CODES[name]
    return codes


def apply_edit(engine: Engine, result_dir: Path, edit: Edit) -> Version:
    """Store the edit's outcome as the structure's next version and return it."""
    start = time.perf_counter()
    case, options = edit.case, PropagationOptions(ends_drawn=edit.ends_drawn, next_rule=NEXT_RULE)
    before = current_version(result_dir, edit.structure)
    if before is None:
        return record(result_dir, edit, propagate(engine, case.ct, case.mask, case.drawn, options), None, start)
    previous = StructureVersions(result_dir, edit.structure).read_mask(before.version)
    previous.CopyInformation(case.ct.input)
    correction = Correction(case.ct.to_canonical(previous) != 0, _canonical_provenance(before, case.slice_map),
                            case.mask, tuple(case.drawn))
    return record(result_dir, edit, refine(engine, case.ct, correction, options), (before, previous), start)


def record(result_dir: Path, edit: Edit, outcome: Propagation, based_on: tuple[Version, sitk.Image] | None,
           start: float) -> Version:
    """The outcome as the structure's next version, in the input file's slice numbering; `based_on`: the version
    it corrected and that version's mask (None: the first version)."""
    case, versions = edit.case, StructureVersions(result_dir, edit.structure)
    before, previous = based_on if based_on is not None else (None, None)
    mask = case.ct.to_input_grid(outcome.mask.astype(np.uint8))
    to_input = case.slice_map.input
    provenance = [PROVENANCE_NAMES[int(outcome.provenance[case.slice_map.canonical(k)])]
                  for k in range(case.slice_map.size)]
    version = Version(
        version=0 if before is None else before.version + 1, kind="propagate" if before is None else "refine",
        based_on=None if before is None else before.version, created=now_iso(), author=edit.author,
        drawn_slices=sorted(to_input(int(z)) for z in np.nonzero(outcome.provenance == DRAWN)[0]),
        corrected_slices=sorted(to_input(z) for z in case.drawn), changed_slices=changed_slices(previous, mask),
        next_slice=None if outcome.next_slice is None else to_input(outcome.next_slice),
        volume_ml=_volume_ml(mask, mask.GetSpacing()), seconds=round(time.perf_counter() - start, 3),
        provenance=provenance)
    return versions.add(mask, version)
