"""Build a support set from labelled CT volumes.

Which slices go in matters as much as how many. The builder takes slices
spread evenly over each case's axial extent of the structure (its ends look
nothing like its middle), records each slice's relative level so the engine
can pair a query with examples from the same level, and adds a few empty
slices just beyond both ends, so the network also learns from the examples
where the structure stops. When a case has fewer slices than asked for and
the set declares itself symmetric (a bladder, a midline target), left-right
mirrored copies fill it and the manifest says so; a one-sided structure is
never mirrored (a mirrored left kidney is a right kidney).

The set also stores each slice as the fine pass sees it: a square crop of
fixed physical side centred on the structure (the largest in-plane extent of
the structure over the cases plus a margin), so a small structure fills
many pixels and every example shows it at one scale.

Each source case also leaves a small copy of itself (CT and mask at about
4 mm, `autocontour.support.registration.AtlasCase`) in the set: a new patient's scan
is registered to it, and the warped mask tells the engine where to look and
what the structure should roughly be (the registration prior).

A case is a CT (NIfTI, or a DICOM series as a folder or zip) and its mask:
a binary NIfTI mask, a label map (with a label value or a recipe), or an
RTSTRUCT with the ROI named by one of the clinic's names for it. Which cases
may join a set, and the provenance each leaves in the manifest, are
`autocontour.support.provenance`'s rules; `autocontour.support.grow` adds
cases to an existing set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from pydantic import ValidationError

from autocontour.catalogue import StructureDefinition, default_definition
from autocontour.errors import InputImageError, SupportSetError
from autocontour.io import CanonicalCT, fingerprint, read_image
from autocontour.pipeline.summary import Summary
from autocontour.preprocess import PreprocessSpec, mask_centre_mm, mask_to_grid, prepare, prepare_crop
from autocontour.support.localise import bone_profile
from autocontour.support.provenance import CaseFiles, as_case_files, case_provenance, known_scans, refuse_known_scan
from autocontour.support.recipes import Recipe
from autocontour.support.registration import AtlasCase, make_atlas_case
from autocontour.support.store import (
    SourceCase,
    SupportCrop,
    SupportManifest,
    SupportSet,
    SupportSlice,
    save_atlas_copy,
    save_support_set,
)

if TYPE_CHECKING:
    from autocontour.dicom.series import DicomSeries

MIN_FOREGROUND_PIXELS = 4
NEGATIVE_MARGIN_SLICES = 4
CROP_MARGIN_FRACTION, CROP_MIN_MARGIN_MM = 0.25, 15.0  # context around the structure's extent, each side
CROP_MAX_FRACTION = 0.8  # a crop nearly as wide as the whole-body view would add nothing: no crops then


@dataclass
class LabelledCase:
    """A CT and the mask of the structure on it, both canonical and on the model grid."""

    case: SourceCase
    images: np.ndarray  # (Z, H, W) model input
    labels: np.ndarray  # (Z, H, W) uint8
    z_mm: np.ndarray  # (Z,)
    body_slices: np.ndarray  # (Z,) bool
    ct: CanonicalCT
    mask: np.ndarray  # (z, y, x) bool on the canonical CT
    grid_side_mm: float  # side of the whole-body model view
    atlas: AtlasCase | None = None  # the small copy for the registration prior


def label_names_for(mask_path: Path, explicit: Path | None = None) -> dict[str, int]:
    """Label name -> value, from an explicit JSON file or a labels.json beside the mask."""
    path = explicit or Path(mask_path).with_name("labels.json")
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {str(name): int(value) for value, name in data.items()}


def structure_mask(mask_image: sitk.Image, ct: CanonicalCT, label: int | None, recipe: Recipe | None,
                   names: dict[str, int]) -> tuple[np.ndarray, str]:
    """The structure as a canonical binary mask, and how it was made."""
    label_map = ct.to_canonical(mask_image)
    if recipe is not None:
        missing: list[str] = []
        mask = recipe.evaluate(label_map, names, ct.spacing_zyx, missing)
        how = f"recipe {recipe.structure}" + (f" (absent, counted empty: {', '.join(missing)})" if missing else "")
        return mask, how
    if label is not None:
        return label_map == label, f"label {label}"
    values = np.unique(label_map)
    if not set(values.tolist()) <= {0, 1}:
        raise SupportSetError(f"the mask has values {values[:8].tolist()}...; give --label VALUE for a label map")
    return label_map == 1, "binary mask"


def is_rtstruct(path: Path) -> bool:
    """A DICOM file (by its preamble) rather than a NIfTI mask; or a file named .dcm, which is then read (and
    refused if it is not DICOM) as the RTSTRUCT it claims to be, not as a NIfTI with the wrong extension."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


def read_case_ct(path: Path) -> tuple[sitk.Image, DicomSeries | None]:
    """A case's CT from NIfTI or a DICOM series (folder or zip), with the same checks and limits as segmentation;
    the series too when it is DICOM (an RTSTRUCT is checked against it)."""
    from autocontour.config import Settings
    from autocontour.dicom.reading import read_input

    return read_input(Path(path), Settings())


def read_case_mask(mask_path: Path, ct_image: sitk.Image, rois: list[str] | None,
                   series: DicomSeries | None = None) -> tuple[sitk.Image, str | None]:
    """The case's mask image on the CT's grid, and the RTSTRUCT ROI it came from (None for NIfTI)."""
    if is_rtstruct(mask_path):
        from autocontour.dicom.roi import rtstruct_mask

        if not rois:
            raise SupportSetError(f"{Path(mask_path).name} is an RTSTRUCT: name the ROI with --roi NAME")
        return rtstruct_mask(mask_path, ct_image, rois, series)
    return read_image(mask_path), None


def grid_mismatch(mask: sitk.Image, ct: sitk.Image) -> str | None:
    """What differs between a mask's voxel grid and the CT's ("size", "spacing", "origin", "direction"), if anything.

    The direction counts as much as the rest: a mask flipped along an axis on the same size, spacing and origin
    would otherwise be read as if it were not, its structure mirrored onto the wrong side.
    """
    checks = (("size", mask.GetSize(), ct.GetSize(), 0), ("spacing", mask.GetSpacing(), ct.GetSpacing(), 1e-4),
              ("origin", mask.GetOrigin(), ct.GetOrigin(), 1e-3),
              ("direction", mask.GetDirection(), ct.GetDirection(), 1e-4))
    for what, ours, theirs, tolerance in checks:
        if len(ours) != len(theirs) or not np.allclose(ours, theirs, atol=tolerance):
            return f"{what} {tuple(round(float(v), 4) for v in ours)} vs {tuple(round(float(v), 4) for v in theirs)}"
    return None


def result_case(result_dir: Path, structure: str, ct_path: Path | None = None
                ) -> tuple[Path, StructureDefinition | None]:
    """The CT of an `autocontour segment` result (checked by fingerprint) and the structure's definition there.

    A reviewed and corrected draft then becomes a support case: a clinic's set grows with every patient.
    """
    summary_path = Path(result_dir) / "summary.json"
    if not summary_path.is_file():
        raise SupportSetError(f"{result_dir} is not an autocontour result: no summary.json")
    try:
        summary = Summary.model_validate_json(summary_path.read_text())
    except ValidationError as exc:
        raise SupportSetError(f"{result_dir} is not an autocontour result: its summary.json does not parse") from exc
    ct_path = Path(ct_path) if ct_path else Path(result_dir) / "review" / "ct.nii.gz"
    if not ct_path.exists():
        raise SupportSetError(f"{result_dir} keeps no copy of its CT: give the CT it segmented with --ct")
    if fingerprint(CanonicalCT(read_case_ct(ct_path)[0]).image) != summary.input.fingerprint:
        raise SupportSetError(f"{ct_path.name} is not the CT that {result_dir} segmented (fingerprints differ)")
    declared = summary.structures.get(structure)
    return ct_path, declared.definition if declared else None


def load_case(case_id: str, ct_path: Path, mask_path: Path, spec: PreprocessSpec, label: int | None = None,
              recipe: Recipe | None = None, names: dict[str, int] | None = None,
              rois: list[str] | None = None, atlas: bool = True,
              scan: tuple[CanonicalCT, DicomSeries | None] | None = None) -> LabelledCase:
    """The case, its CT read from `ct_path` unless given already read (`scan`: the CT and its DICOM series)."""
    if scan is None:
        ct_image, series = read_case_ct(ct_path)
        scan = CanonicalCT(ct_image), series
    ct, series = scan
    try:
        mask_image, roi = read_case_mask(mask_path, ct.input, rois, series)
    except InputImageError as exc:
        raise InputImageError(f"case {case_id}: {exc}") from exc
    mismatch = grid_mismatch(mask_image, ct.input)
    if mismatch:
        raise InputImageError(f"case {case_id}: the mask's grid differs from the CT's: {mismatch}")
    mask_image.CopyInformation(ct.input)  # within the tolerances: the CT's own values, to the last digit
    mask, how = structure_mask(sitk.Cast(mask_image, sitk.sitkInt32), ct, label, recipe, names or {})
    if roi is not None:
        how = f"RTSTRUCT ROI {roi!r}"
    if not mask.any():
        raise SupportSetError(f"case {case_id}: the structure is empty ({how})")
    model_input = prepare(ct, spec)
    labels = mask_to_grid(mask, ct, model_input.grid)
    zs = np.nonzero(labels.reshape(labels.shape[0], -1).sum(axis=1) >= MIN_FOREGROUND_PIXELS)[0]
    if zs.size == 0:
        raise SupportSetError(f"case {case_id}: the structure is too small to see at {spec.size}x{spec.size}")
    z_mm = ct.slice_positions_mm()
    source = SourceCase(
        case=case_id, fingerprint=fingerprint(ct.image), num_slices=model_input.num_slices,
        spacing_mm=list(ct.image.GetSpacing()), extent_slices=[int(zs.min()), int(zs.max())], label=how,
        extent_mm=[round(float(z_mm[zs.min()]), 3), round(float(z_mm[zs.max()]), 3)],
        bone_profile=bone_profile(ct.array, ct.spacing_zyx, z_mm).to_dict())
    small = make_atlas_case(ct.image, ct.canonical_like(mask.astype(np.uint8))) if atlas else None
    side = model_input.grid.GetSpacing()[0] * spec.size
    return LabelledCase(source, model_input.images, labels, z_mm, model_input.body_slices, ct, mask, side, small)


def in_plane_extent_mm(mask: np.ndarray, spacing_xy) -> float:
    """The larger in-plane side (mm) of a (z, y, x) mask's bounding box."""
    _, ys, xs = np.nonzero(mask)
    return float(max((xs.max() - xs.min() + 1) * spacing_xy[0], (ys.max() - ys.min() + 1) * spacing_xy[1]))


def crop_margin_mm(extent_mm: float) -> float:
    """Context kept around a structure in its crop, each side."""
    return max(CROP_MIN_MARGIN_MM, CROP_MARGIN_FRACTION * extent_mm)


def crop_for(cases: list[LabelledCase]) -> SupportCrop | None:
    """The crop: the structure's largest in-plane extent over the cases plus margins; None when that is
    nearly the whole-body view (CROP_MAX_FRACTION)."""
    extent = max(in_plane_extent_mm(case.mask, case.ct.image.GetSpacing()[:2]) for case in cases)
    margin = crop_margin_mm(extent)
    side = extent + 2 * margin
    if side >= CROP_MAX_FRACTION * min(c.grid_side_mm for c in cases):
        return None
    return SupportCrop(side_mm=round(side, 1), margin_mm=round(margin, 1))


def case_crops(case: LabelledCase, spec: PreprocessSpec, side_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The case's every slice as the fine pass sees it (images, labels), centred on the structure."""
    centre = mask_centre_mm(case.mask, case.ct.image)
    case.case.crop_centre_mm = [round(centre[0], 3), round(centre[1], 3)]
    view = prepare_crop(case.ct, spec, centre, side_mm, case.body_slices)
    return view.images, mask_to_grid(case.mask, case.ct, view.grid)


def _spread(candidates: np.ndarray, n: int) -> np.ndarray:
    """n items spread evenly over a sorted candidate list."""
    if n <= 0 or candidates.size == 0:
        return candidates[:0]
    if n >= candidates.size:
        return candidates
    return candidates[np.unique(np.round(np.linspace(0, candidates.size - 1, n)).astype(int))]


def select_slices(cases: list[LabelledCase], size: int, negative_fraction: float,
                  mirror: bool) -> list[tuple[int, int, bool]]:
    """(case index, slice index, flipped) triples for a support set of `size` slices."""
    n_negative = int(round(size * negative_fraction))
    n_positive = size - n_negative
    positives = [np.nonzero(c.labels.reshape(c.labels.shape[0], -1).sum(axis=1) >= MIN_FOREGROUND_PIXELS)[0]
                 for c in cases]
    total = sum(p.size for p in positives)
    quota = [max(1, int(round(n_positive * p.size / total))) for p in positives]
    picks: list[tuple[int, int, bool]] = []
    for i, (pos, want) in enumerate(zip(positives, quota, strict=True)):
        chosen = _spread(pos, want)
        picks += [(i, int(z), False) for z in chosen]
        if mirror and want > chosen.size:
            picks += [(i, int(z), True) for z in _spread(pos, want - chosen.size)]
    for i, case in enumerate(cases):
        lo, hi = case.case.extent_slices
        below = [z for z in range(lo - NEGATIVE_MARGIN_SLICES, lo) if z >= 0 and case.body_slices[z]]
        above = [z for z in range(hi + 1, hi + 1 + NEGATIVE_MARGIN_SLICES)
                 if z < len(case.body_slices) and case.body_slices[z]]
        share = int(round(n_negative / len(cases)))
        picks += [(i, int(z), False) for z in _spread(np.array(below, dtype=int), share - share // 2)]
        picks += [(i, int(z), False) for z in _spread(np.array(above, dtype=int), share // 2)]
    return picks[:size] if len(picks) > size else picks


@dataclass
class CaseRules:
    """How the given cases' masks are read, and what is taken from them."""

    label: int | None = None  # label value, when masks are label maps
    recipe: Recipe | None = None
    label_names: Path | None = None  # JSON {value: name} for recipes (default: labels.json beside the mask)
    rois: list[str] | None = None  # ROI names to take from RTSTRUCT masks
    atlas: bool = True  # keep each case's small copy for the registration prior
    allow_unapproved: bool = False  # take RTSTRUCTs that no clinician approved


def load_cases(cases: Sequence[tuple[Path, Path] | CaseFiles], spec: PreprocessSpec, rules: CaseRules, out: Path,
               existing: Sequence[SourceCase] = ()) -> list[LabelledCase]:
    """Load the cases (ids after the `existing` ones), each with its provenance and its atlas copy saved in
    `out`. Drafts no clinician approved are refused before any CT is read, and a scan given twice, or
    already among `existing`, once it is."""
    given = [as_case_files(c) for c in cases]
    taken = {c.case for c in existing}
    ids = list(islice((f"case{i}" for i in count() if f"case{i}" not in taken), len(given)))
    provenance = [case_provenance(case, case_id, rules.allow_unapproved) for case, case_id in zip(given, ids,
                                                                                                     strict=True)]
    loaded, known = [], known_scans(existing)
    for case, case_id, origin in zip(given, ids, provenance, strict=True):
        ct_image, series = read_case_ct(case.ct)
        ct = CanonicalCT(ct_image)
        refuse_known_scan(case_id, fingerprint(ct.image), known)
        loaded.append(load_case(case_id, case.ct, case.mask, spec, rules.label, rules.recipe,
                                label_names_for(case.mask, rules.label_names), rules.rois, rules.atlas,
                                (ct, series)))
        loaded[-1].case.provenance = origin
    for labelled in loaded:
        if labelled.atlas is not None:
            labelled.case.atlas = save_atlas_copy(labelled.atlas, Path(out), labelled.case.case)
    return loaded


def build_support_set(name: str, structure: str, cases: Sequence[tuple[Path, Path] | CaseFiles], out: Path,
                      size: int = 64, label: int | None = None, recipe: Recipe | None = None,
                      label_names: Path | None = None, spec: PreprocessSpec | None = None,
                      negative_fraction: float = 0.125, symmetric: bool = False, description: str = "",
                      source: str = "", preview: bool = True, definition: StructureDefinition | None = None,
                      rois: list[str] | None = None, atlas: bool = True, crop: bool = True,
                      allow_unapproved: bool = False) -> SupportSet:
    """Build, save and return a support set (see the module docstring for the choices).

    `definition` declares the structure (default: the built-in one of that name, or a plain organ);
    `symmetric` allows mirrored copies; `rois` are the ROI names to take from RTSTRUCT masks;
    `atlas` keeps each case's small copy for the registration prior; `crop` stores structure-centred crops;
    `allow_unapproved` takes RTSTRUCTs that no clinician approved.
    """
    definition = _checked_request(structure, cases, size, negative_fraction, symmetric, definition)
    spec = spec or PreprocessSpec()
    loaded = load_cases(cases, spec, CaseRules(label, recipe, label_names, rois, atlas, allow_unapproved), out)
    picks = select_slices(loaded, size, negative_fraction, symmetric)
    crop_spec = crop_for(loaded) if crop else None
    crops = [case_crops(case, spec, crop_spec.side_mm) for case in loaded] if crop_spec else None

    picked = picked_slices(loaded, picks, crops)
    slices, warnings = picked.slices, []
    if len(picks) < size:
        warnings.append(f"asked for {size} slices, the cases supply {len(picks)}")
    warnings += [w for w in (mirrored_warning(slices),) if w]

    manifest = SupportManifest(
        name=name, structure=structure, definition=definition, symmetric=symmetric, description=description,
        created=datetime.now(UTC).isoformat(timespec="seconds"), source=source,
        preprocessing=spec, recipe=recipe.to_dict() if recipe else None,
        crop=crop_spec,
        source_cases=[c.case for c in loaded], slices=slices, warnings=warnings)
    support = save_support_set(manifest, np.stack(picked.images), np.stack(picked.labels), out,
                               (np.stack(picked.crop_images), np.stack(picked.crop_labels)) if crops else None)
    if preview:
        from autocontour.preview import support_set_preview  # matplotlib: only when a preview is drawn

        support_set_preview(support, Path(out) / "preview.png")
    return support


def mirrored_warning(slices: list[SupportSlice]) -> str | None:
    """The manifest's warning that some slices are mirrored copies, or None when none is."""
    flipped = sum(s.flipped for s in slices)
    return f"{flipped} slices are left-right mirrored copies" if flipped else None


def _checked_request(structure: str, cases: Sequence[object], size: int, negative_fraction: float,
                     symmetric: bool, definition: StructureDefinition | None) -> StructureDefinition:
    """Refuse a request that cannot make a sound set; returns the structure's definition."""
    if not cases:
        raise SupportSetError("give at least one --case CT MASK")
    if size < 2:
        raise SupportSetError(f"support size must be at least 2, got {size}")
    if not 0 <= negative_fraction < 1:
        raise SupportSetError(f"negative fraction must be in [0, 1), got {negative_fraction}")
    definition = definition or default_definition(structure)
    if definition.name != structure:
        raise SupportSetError(f"the definition is of {definition.name!r}, the set segments {structure!r}")
    if symmetric and definition.lateral:
        raise SupportSetError(f"{structure!r} is {definition.laterality}-sided: a mirrored copy would show the other "
                              "side, so a lateral structure cannot be declared symmetric")
    return definition


@dataclass
class _PickedSlices:
    """The chosen slices' arrays (mirrored where picked so) and their manifest entries, in pick order, so the
    set's arrays and its manifest stay aligned."""

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    crop_images: list[np.ndarray] = field(default_factory=list)
    crop_labels: list[np.ndarray] = field(default_factory=list)
    slices: list[SupportSlice] = field(default_factory=list)


def picked_slices(loaded: list[LabelledCase], picks: list[tuple[int, int, bool]],
                   crops: list[tuple[np.ndarray, np.ndarray]] | None) -> _PickedSlices:
    picked = _PickedSlices()
    for i, z, flipped in picks:
        case = loaded[i]
        lo, hi = case.case.extent_slices
        flip = (slice(None), slice(None, None, -1) if flipped else slice(None))
        picked.images.append(case.images[z][flip])
        picked.labels.append(lab := case.labels[z][flip])
        if crops:
            picked.crop_images.append(crops[i][0][z][flip])
            picked.crop_labels.append(crops[i][1][z][flip])
        picked.slices.append(SupportSlice(
            case=case.case.case, slice_index=z, z_mm=float(case.z_mm[z]),
            level=float((z - lo) / max(hi - lo, 1)), foreground_pixels=int(lab.sum()), flipped=flipped))
    return picked
