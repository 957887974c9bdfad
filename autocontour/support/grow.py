"""`autocontour support add`: new cases join an existing support set, which keeps every slice it had.

A set's stored slices are what it is (the CTs it was built from may be long gone), so growing it must not
mean rebuilding it from a restated list of cases, where leaving one out silently replaces the set. The set
keeps its slices, cases, definition, preprocessing and crop as they are; each new case adds slices chosen
the way `support build` chooses them (`autocontour.support.build`): spread over the structure's extent, with
empty slices beyond its ends in the set's own proportion, and cropped at the set's crop side, so every example
still shows the structure at one scale. By default a new case brings as many slices as the old ones did on
average, so each case weighs about the same.

The new cases pass the same gates as in a build (`autocontour.support.provenance`): no draft that no clinician
approved, no scan the set already has. The grown set gets a new content hash, hence a new id. It is
assembled in a copy beside the set and swapped in at the end, so an interrupted or refused addition leaves
the old set whole.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from autocontour.errors import NotApprovedError, SupportSetBusyError, SupportSetError
from autocontour.pipeline.versions import StructureVersions, approval_of
from autocontour.support.build import (
    CROP_MIN_MARGIN_MM,
    CaseRules,
    LabelledCase,
    case_crops,
    in_plane_extent_mm,
    load_cases,
    mirrored_warning,
    picked_slices,
    result_case,
    select_slices,
)
from autocontour.support.provenance import CaseFiles
from autocontour.support.store import PREVIEW, SupportManifest, SupportSet, load_support_set, save_support_set

LOCK_WAIT_S = 120  # an addition takes seconds; a longer wait means one is stuck


def add_cases(folder: Path, cases: Sequence[tuple[Path, Path] | CaseFiles], rules: CaseRules,
              slices_per_case: int | None = None, out: Path | None = None, preview: bool = True) -> SupportSet:
    """Add `cases` to the support set in `folder` (written to `out` instead, when given); returns the grown set."""
    if not Path(folder).is_dir():
        raise SupportSetError(f"support-set folder not found: {folder}")
    if not cases:
        raise SupportSetError("give at least one case to add")
    if slices_per_case is not None and slices_per_case < 1:
        raise SupportSetError(f"slices per case must be at least 1, got {slices_per_case}")
    target = Path(out or folder)
    if target.resolve() != Path(folder).resolve() and target.exists() and any(target.iterdir()):
        raise SupportSetError(f"{target} exists and is not empty: give a new folder, or none to grow the set in place")
    stage = target.parent / f".{target.name}.adding"
    with _one_addition_at_a_time(target):
        support = load_support_set(folder)  # as it is now: an addition that waited for the lock grows the grown set
        shutil.rmtree(stage, ignore_errors=True)  # left by an addition that was killed
        shutil.copytree(folder, stage)
        try:
            grown = _grow(support, cases, rules, slices_per_case, stage)
            if preview:
                from autocontour.preview import support_set_preview  # matplotlib: only when a preview is drawn

                support_set_preview(grown, stage / PREVIEW)
            _swap_in(stage, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return load_support_set(target)


def add_approved_result(folder: Path, result_dir: Path, structure: str, job_id: str) -> SupportSet:
    """The approved version of `structure` in a server job's result, on the CT the job kept, as a new case of
    the set in `folder`. Only what a clinician approved may teach the network; the provenance names the job, who
    approved and when."""
    approval = approval_of(result_dir)
    if approval is None:
        raise NotApprovedError("the job is not approved: approve it first (a support case must be contours a "
                               "clinician approved)")
    version = approval["versions"].get(structure)
    if version is None:
        raise NotApprovedError(f"the job's approval covers no {structure}: approve the job again")
    ct, _ = result_case(result_dir, structure)
    mask = StructureVersions(result_dir, structure).mask_path(version)
    case = CaseFiles(ct, mask, "result", job_id=job_id, approved_by=approval["by"], approved_on=approval["at"])
    return add_cases(folder, [case], CaseRules())


@contextmanager
def _one_addition_at_a_time(target: Path) -> Iterator[None]:
    """Two additions to one set (two approvals, a server and the CLI) would share the staging folder and the
    second would drop the first one's case: each waits for the other, across processes. The lock is a file
    `<set>.lock` beside the set's folder (the folder itself is swapped out by an addition), opened for writing
    (NFS emulates flock with locks that need write access). Waits at most LOCK_WAIT_S."""
    target.parent.mkdir(parents=True, exist_ok=True)
    holder = os.open(target.parent / f"{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SupportSetBusyError(f"another addition to the support set {target.name} is still "
                                              f"running after {LOCK_WAIT_S} s: try again later") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(holder)  # releases the lock


def _grow(support: SupportSet, cases: Sequence[tuple[Path, Path] | CaseFiles], rules: CaseRules,
          slices_per_case: int | None, stage: Path) -> SupportSet:
    """The set with the new cases' slices appended, saved in `stage` (a copy of the set's folder)."""
    manifest = support.manifest
    loaded = load_cases(cases, manifest.preprocessing, rules, stage, manifest.source_cases)
    per_case = slices_per_case or max(1, round(len(support) / max(len(manifest.source_cases), 1)))
    empty_share = sum(s.foreground_pixels == 0 for s in manifest.slices) / max(len(manifest.slices), 1)
    picks = select_slices(loaded, per_case * len(loaded), empty_share, manifest.symmetric)
    crops = [case_crops(c, manifest.preprocessing, manifest.crop.side_mm) for c in loaded] if manifest.crop else None
    picked = picked_slices(loaded, picks, crops)
    slices = manifest.slices + picked.slices
    warnings = [w for w in manifest.warnings if w != mirrored_warning(manifest.slices)]
    warnings += [w for w in (mirrored_warning(slices),) if w] + _crop_warnings(loaded, manifest)
    grown = manifest.model_copy(update={
        "source_cases": manifest.source_cases + [c.case for c in loaded], "slices": slices, "warnings": warnings,
        "updated": datetime.now(UTC).isoformat(timespec="seconds")})
    images = np.concatenate([support.images, np.stack(picked.images)])
    labels = np.concatenate([support.labels > 0, np.stack(picked.labels) > 0])
    stored_crops = None
    if support.crop_images is not None and support.crop_labels is not None:
        stored_crops = (np.concatenate([support.crop_images, np.stack(picked.crop_images)]),
                        np.concatenate([support.crop_labels > 0, np.stack(picked.crop_labels) > 0]))
    return save_support_set(grown, images, labels, stage, stored_crops)


def _crop_warnings(loaded: list[LabelledCase], manifest: SupportManifest) -> list[str]:
    """A new case whose structure is wider than the set's crop leaves it (the crop side is the set's)."""
    if manifest.crop is None:
        return []
    side = manifest.crop.side_mm
    return [f"{case.case.case}: the structure is {extent:.0f} mm across, too wide for the set's {side:.0f} mm crop "
            "with its margins; `support build` with every case sizes the crop anew"
            for case in loaded
            if (extent := in_plane_extent_mm(case.mask, case.ct.image.GetSpacing()[:2])) + 2 * CROP_MIN_MARGIN_MM
            > side]


def _swap_in(stage: Path, target: Path) -> None:
    """Put the finished set where it belongs; the old one goes only once the new one is in place."""
    if not target.exists():
        stage.rename(target)
        return
    replaced = target.parent / f".{target.name}.replaced"
    shutil.rmtree(replaced, ignore_errors=True)
    target.rename(replaced)
    stage.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
