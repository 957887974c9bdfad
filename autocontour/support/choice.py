"""Which of a support set's source cases to register to a scan: the few whose bodies look most like it.

A registration costs seconds and a clinic's set grows with every reviewed patient, so registering every
source case would make a set of 30 cases cost 30 registrations. Before registering, each case is compared
with the scan by a cheap global similarity on the atlas copies the set already keeps: the body's outline
and its skeleton along the body axis (`AxialShape`: the body's and the bone's cross-section area on every
4 mm slice). Two patients of like build scanned on like positions have the same profile (head, neck,
shoulders; the mandible and the skull base as bone peaks); a thin neck against a broad one, or a scan that
stops at the chin against one that runs to the shoulders, differ. Profiles are compared at their best axial
shift (`shape_distance`), so scans framed differently along z are still compared level for level, as the
registration itself will align them. It costs milliseconds a case against seconds a registration.

The CHOSEN_CASES nearest are registered (ties broken by case id, so the same set and scan always give
the same cases); their warped masks are fused into the prior (`autocontour.support.prior`). How many:
bench/clinic.py (bench/RESULTS.md, "Clinic benchmark").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from autocontour.support.registration import AIR_HU, MIN_OVERLAP_MM

CHOSEN_CASES = 3  # source cases registered per scan, whatever the set's size
BONE_HU = 300.0  # bone on the smoothed 4 mm copy (cortical bone partial-volumed with marrow and soft tissue)
MIN_OVERLAP_SHARE = 0.5  # profiles are compared over at least half the shorter body's length


@dataclass(frozen=True)
class AxialShape:
    """Per axial slice of an atlas CT's body, log(1 + area in cm2) of the body and of its bone."""

    spacing_mm: float  # slice distance: profiles are compared slice for slice only at equal spacing
    features: np.ndarray  # (Z, 2) over the slices that show the body, inferior to superior


def axial_shape(atlas_ct: sitk.Image) -> AxialShape:
    """The profile of an atlas CT (`make_atlas_ct`: LPS, air outside the body)."""
    hu = sitk.GetArrayViewFromImage(atlas_ct)
    spacing = atlas_ct.GetSpacing()
    pixel_cm2 = spacing[0] * spacing[1] / 100.0
    body = (hu > AIR_HU).reshape(hu.shape[0], -1).sum(axis=1) * pixel_cm2
    bone = (hu > BONE_HU).reshape(hu.shape[0], -1).sum(axis=1) * pixel_cm2
    shown = np.nonzero(body > 0)[0]
    rows = slice(shown[0], shown[-1] + 1) if shown.size else slice(0, 0)
    return AxialShape(float(spacing[2]), np.log1p(np.stack([body[rows], bone[rows]], axis=1)))


def shape_distance(source: AxialShape, query: AxialShape) -> float:
    """Root-mean-square profile difference at the best axial shift (inf when the bodies cannot overlap).

    Every shift that overlaps at least MIN_OVERLAP_SHARE of the shorter body (and MIN_OVERLAP_MM, or all
    of a shorter one) is tried: a short overlap would match anything by chance.
    """
    if source.spacing_mm != query.spacing_mm or not len(source.features) or not len(query.features):
        return float("inf")
    a, b = source.features, query.features
    shorter = min(len(a), len(b))
    need = max(min(shorter, int(np.ceil(MIN_OVERLAP_MM / query.spacing_mm))), int(MIN_OVERLAP_SHARE * shorter), 1)
    best = float("inf")
    for shift in range(need - len(a), len(b) - need + 1):  # source slice i lies at query slice i + shift
        lo, hi = max(0, shift), min(len(b), len(a) + shift)
        difference = a[lo - shift:hi - shift] - b[lo:hi]
        best = min(best, float(np.sqrt(np.mean(np.sum(difference ** 2, axis=1)))))
    return best


def choose_cases(query: AxialShape, sources: dict[str, AxialShape], k: int = CHOSEN_CASES) -> list[str]:
    """The k source cases nearest the query by `shape_distance`, nearest first; ties by case id."""
    ranked = sorted(sources, key=lambda case: (shape_distance(sources[case], query), case))
    return ranked[:max(0, k)]
