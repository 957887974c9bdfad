"""summary.json as typed models: what a reviewer, a planning system and an audit need to judge a result.

The summary is built from the stages' results without changing them (a warning the summary adds stays in the
summary), and once built it is only read: the CLI, the server's job resource and review page, and
`autocontour support build --from-result` read its typed fields; summary.json is its dump.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field, model_serializer

from autocontour import __version__
from autocontour.catalogue import StructureDefinition
from autocontour.engine.prediction import StructurePrediction
from autocontour.export import mask_file
from autocontour.io import CanonicalCT
from autocontour.model.weights import ModelCard
from autocontour.pipeline.calibration import ConfidenceCalibration
from autocontour.pipeline.evidence import discounted, discounts
from autocontour.postprocess import StructureMask, confidence, laterality_warning
from autocontour.support.store import SupportSet

DRAFT_DISCLAIMER = (
    "Automatic draft contours for review by a qualified clinician. They are not approved for treatment "
    "planning until a clinician has reviewed and, where needed, corrected every slice.")
SLICE_CONVENTION = ("slice = axial index counted from the most inferior slice; z_mm = patient superior coordinate "
                    "(DICOM/LPS) of that slice")
NO_DICOM_OUTPUT = "no structure has any voxel: no RTSTRUCT or DICOM-SEG written"
Status = Literal["found", "not_in_scan", "not_localised", "not_found_in_searched_range", "below_threshold"]


class _OmitsNone(BaseModel):
    """A part of the summary whose optional keys are left out when they do not apply, not written as null."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class FlaggedSlice(BaseModel):
    slice: int
    reason: str
    z_mm: float


class LocalisationSummary(BaseModel):
    """Where the bone profiles placed the structure, and whether the search used it."""

    verdict: str
    reason: str | None
    applied: bool
    match_score: float | None
    expected_z_mm: list[float] | None
    window_z_mm: list[float] | None


class StructureSummary(BaseModel):
    """One structure: status, volume, extent, confidence and flagged slices, and how it was predicted."""

    display_name: str
    definition: StructureDefinition
    status: Status
    status_reason: str | None
    mask_file: str
    volume_ml: float
    voxels: int
    slice_range: list[int] | None
    z_range_mm: list[float] | None
    confidence: float | None = Field(description="network_confidence times the factor of each reason in "
                                                  "confidence_discounts: what to trust, from 0 to 1")
    network_confidence: float | None = Field(description="certainty x agreement of the network's map, "
                                                          "area-weighted over the slices")
    confidence_discounts: list[str] = Field(description="weak evidence behind the structure, each with its factor")
    estimated_surface_dice: float | None = Field(None, description=(
        "the surface Dice at the structure's tolerance that drafts of this confidence reached on the cases a "
        "calibration was fitted on (setting confidence_calibration); none without one for these weights"))
    slice_confidence: dict[str, float]
    flagged_slices: list[FlaggedSlice]
    postprocessing: dict[str, int]
    support_set: dict[str, Any]
    support_size: int
    ensemble: int
    slices_computed: int
    searched_z_mm: list[float] | None
    localisation: LocalisationSummary | None
    source_cases_used: dict[str, int]
    registration_prior: dict[str, Any] | None
    crop: dict[str, Any] | None
    planes: dict[str, int]
    query_support_pairs: int
    warnings: list[str]


class InputSummary(_OmitsNone):
    """The scan, identified by a content hash (file names can carry identifiers), and its geometry."""

    fingerprint: str
    size: list[int]
    spacing_mm: list[float]
    origin_mm: list[float]
    direction: list[float]
    orientation: str
    slice_convention: str = SLICE_CONVENTION
    format: Literal["DICOM series"] | None = None  # left out for NIfTI input


class ModelSummary(ModelCard):
    """The weights' card, and where and at which precision the network ran."""

    device: str
    precision: str
    precision_note: str


class OutputFiles(_OmitsNone):
    """The files of the result, relative to its folder (preview and DICOM only where written)."""

    masks: dict[str, str]
    probabilities: dict[str, str]
    preview: str | None = None
    rtstruct: str | None = None
    seg: str | None = None

    def dicom(self) -> dict[str, str]:
        """The DICOM outputs written, by kind (rtstruct, seg)."""
        return {k: v for k, v in (("rtstruct", self.rtstruct), ("seg", self.seg)) if v}


class Summary(BaseModel):
    """summary.json."""

    disclaimer: str = DRAFT_DISCLAIMER
    notices: list[str]
    autocontour_version: str = __version__
    input: InputSummary
    model: ModelSummary
    options: dict[str, Any]
    overlap_rules: dict[str, Any]
    rule_changes: list[dict[str, Any]]
    structures: dict[str, StructureSummary]
    timings_s: dict[str, float]
    warnings: list[str]
    files: OutputFiles


def input_summary(image: sitk.Image, canonical: CanonicalCT, fingerprint: str, dicom: bool) -> InputSummary:
    return InputSummary(fingerprint=fingerprint, size=list(image.GetSize()),
                        spacing_mm=[round(s, 6) for s in image.GetSpacing()],
                        origin_mm=[round(o, 6) for o in image.GetOrigin()],
                        direction=[round(d, 6) for d in image.GetDirection()],
                        orientation=canonical.input_orientation, format="DICOM series" if dicom else None)


def structure_summary(name: str, m: StructureMask, prediction: StructurePrediction, support: SupportSet,
                      body: np.ndarray | None, spacing: tuple[float, ...], z_mm: np.ndarray, threshold: float,
                      axial_search: str, scan_fingerprint: str,
                      calibration: ConfidenceCalibration | None = None) -> StructureSummary:
    """One structure's entry, with the midline check for a lateral structure where `body` is given."""
    definition = support.definition
    # model-grid slices are the canonical slices (same z positions), so per-slice arrays carry over
    conf = confidence(m.mask, m.probability, prediction.agreement, prediction.computed, spacing[0] * spacing[1])
    flagged, warnings = conf.flagged, list(prediction.warnings)
    crossing = laterality_warning(m.mask, body, definition.laterality) if (
        body is not None and definition.lateral and m.mask.any()) else None
    if crossing:
        warnings.append(crossing["warning"])
        flagged = sorted(flagged + [{"slice": z, "reason": "crosses the body midline"} for z in crossing["slices"]],
                         key=lambda f: f["slice"])
    weak = discounts(prediction, m.mask, support, axial_search, scan_fingerprint) if m.mask.any() else []
    voxels = int(m.mask.sum())
    zs = np.nonzero(m.mask.any(axis=(1, 2)))[0]
    status, reason = _status(voxels, prediction, float(m.probability.max()), threshold)
    return StructureSummary(
        display_name=definition.display_name, definition=definition, status=status, status_reason=reason,
        mask_file=mask_file(name), volume_ml=round(voxels * float(np.prod(spacing)) / 1000, 3), voxels=voxels,
        slice_range=[int(zs.min()), int(zs.max())] if voxels else None,
        z_range_mm=[round(float(z_mm[zs.min()]), 2), round(float(z_mm[zs.max()]), 2)] if voxels else None,
        confidence=(score := discounted(conf.structure, weak)), network_confidence=conf.structure,
        estimated_surface_dice=calibration.estimate(score) if calibration else None,
        confidence_discounts=[f"{d.reason} (x{d.factor:.2f})" for d in weak],
        slice_confidence={str(z): c for z, c in conf.per_slice.items()},
        flagged_slices=[FlaggedSlice(**f, z_mm=round(float(z_mm[f["slice"]]), 2)) for f in flagged],
        postprocessing=m.changes, support_set=support.describe(), support_size=prediction.support_size,
        ensemble=prediction.ensemble, slices_computed=prediction.queries,
        searched_z_mm=list(prediction.searched_mm) if prediction.searched_mm else None,
        localisation=_localisation_summary(prediction, axial_search), source_cases_used=prediction.cases_used,
        registration_prior=(prediction.prior.describe() | {"fusion_weight": prediction.prior_weight}
                            if prediction.prior else None),
        crop=prediction.crop, planes=prediction.planes, query_support_pairs=prediction.pairs, warnings=warnings)


def _status(voxels: int, prediction: StructurePrediction, max_probability: float, threshold: float
            ) -> tuple[Status, str | None]:
    """found, or why a structure is empty: not_in_scan, not_localised, not_found_in_searched_range,
    below_threshold."""
    if voxels:
        return "found", None
    if prediction.not_in_scan:
        return "not_in_scan", prediction.localisation.reason if prediction.localisation else None
    if prediction.not_localised:
        return "not_localised", prediction.localisation.reason if prediction.localisation else None
    searched = (f"z {prediction.searched_mm[0]:g} to {prediction.searched_mm[1]:g} mm" if prediction.searched_mm
                else "no body slice")
    if not prediction.computed.any():
        return "not_found_in_searched_range", f"the coarse search of {searched} found no slice showing it"
    return "below_threshold", (f"{int(prediction.computed.sum())} slices of {searched} segmented; the highest "
                               f"probability {max_probability:.2f} stays below the threshold {threshold:g} "
                               "(or the clean-up removed what was above it)")


def _localisation_summary(prediction: StructurePrediction, axial_search: str) -> LocalisationSummary | None:
    located = prediction.localisation
    if located is None:
        return None
    return LocalisationSummary(
        verdict=located.verdict, reason=located.reason, applied=axial_search != "all",
        match_score=None if located.score is None else round(located.score, 3),
        expected_z_mm=[round(v, 1) for v in located.expected_mm] if located.expected_mm else None,
        window_z_mm=list(prediction.window_mm) if prediction.window_mm else None)


def summary_warnings(structures: dict[str, StructureSummary], oblique: bool, *notes: list[str]) -> list[str]:
    """Every structure's warnings (named), the scan's, then the stages' notes in the order they ran."""
    warnings = [f"{n}: {w}" for n, s in structures.items() for w in s.warnings]
    if oblique:
        warnings.append("the CT is oblique: it was resampled to an axis-aligned grid for segmentation")
    return warnings + [note for stage in notes for note in stage]
