"""Where along the body axis a structure can be: matching bone profiles between scans.

A bladder support set shows bladders, but an in-context network shown bladder
slices will also find bladder-like tissue elsewhere (a full stomach, the
liver). The skeleton says where the pelvis is: the area of bone on each axial
slice, plotted along z, has the same landmarks in every patient (femoral
heads, the pelvic ring, sacrum, lumbar spine, ribs). Each support set stores
this profile for its source cases; for a new scan the source profile is
matched to the scan's own (a 1-D registration: scale and shift along z,
maximising correlation), and the structure's extent in the source case,
mapped through that match and widened by a margin, is where the engine looks.
Correlation alone ignores magnitude, and a flat stretch of lumbar spine can
correlate with a pelvis by chance; bone area is a physical quantity that
differs between adults by far less than the 5-10x between pelvis and lumbar
spine, so a match whose mean bone areas differ by more than MAX_AREA_RATIO is
not a match. If no source case matches well enough, the whole scan is
searched and the result says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

BONE_HU = 300.0
SAMPLE_MM = 3.0
SMOOTH_MM = 6.0
SCALES = np.arange(0.85, 1.151, 0.025)  # patients differ in height
MIN_OVERLAP_MM = 120.0
MIN_SCORE = 0.6
MARGIN_MM = 30.0
MAX_AREA_RATIO = 2.5


@dataclass(frozen=True)
class Profile:
    """Bone area (mm2) per axial position, sampled every SAMPLE_MM from z0_mm upwards."""

    z0_mm: float
    values: tuple[float, ...]

    @property
    def z(self) -> np.ndarray:
        return self.z0_mm + SAMPLE_MM * np.arange(len(self.values))

    def to_dict(self) -> dict:
        return {"z0_mm": round(self.z0_mm, 3), "step_mm": SAMPLE_MM,
                "bone_area_mm2": [round(v, 1) for v in self.values]}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(float(data["z0_mm"]), tuple(float(v) for v in data["bone_area_mm2"]))


def bone_profile(hu: np.ndarray, spacing_zyx, z_mm: np.ndarray) -> Profile:
    """The bone profile of a canonical (z, y, x) CT whose slices lie at z_mm (increasing)."""
    pixel_mm2 = float(spacing_zyx[1] * spacing_zyx[2])
    area = (hu > BONE_HU).reshape(hu.shape[0], -1).sum(axis=1) * pixel_mm2
    grid = np.arange(z_mm[0], z_mm[-1] + 1e-6, SAMPLE_MM)
    sampled = np.interp(grid, z_mm, area)
    smooth = ndimage.gaussian_filter1d(sampled, SMOOTH_MM / SAMPLE_MM)
    return Profile(float(grid[0]), tuple(float(v) for v in smooth))


@dataclass(frozen=True)
class Match:
    scale: float
    shift_mm: float  # z_query = scale * z_source + shift_mm
    score: float  # Pearson correlation over the overlap

    def map(self, z_source: float) -> float:
        return self.scale * z_source + self.shift_mm


@functools.lru_cache(maxsize=64)  # support sets built from the same case share its profile
def match(source: Profile, query: Profile) -> Match | None:
    """The scale and shift along z that best align the source profile with the query's."""
    qz, qv = query.z, np.asarray(query.values)
    sz, sv = source.z, np.asarray(source.values)
    best: Match | None = None
    for scale in SCALES:
        # candidate shifts: every sample offset that leaves enough overlap
        lo = qz[0] - scale * sz[-1] + MIN_OVERLAP_MM
        hi = qz[-1] - scale * sz[0] - MIN_OVERLAP_MM
        for shift in np.arange(lo, hi + 1e-6, SAMPLE_MM):
            mapped = scale * sz + shift
            inside = (mapped >= qz[0]) & (mapped <= qz[-1])
            if inside.sum() * SAMPLE_MM * scale < MIN_OVERLAP_MM:
                continue
            a = sv[inside]
            b = np.interp(mapped[inside], qz, qv)
            if a.std() < 1e-6 or b.std() < 1e-6:
                continue
            if not 1 / MAX_AREA_RATIO <= a.mean() / max(b.mean(), 1e-6) <= MAX_AREA_RATIO:
                continue
            score = float(np.corrcoef(a, b)[0, 1])
            if best is None or score > best.score:
                best = Match(float(scale), float(shift), score)
    return best


def expected_range(cases: list[tuple[Profile, tuple[float, float]]], query: Profile,
                   margin_mm: float = MARGIN_MM) -> tuple[tuple[float, float] | None, float]:
    """(z range in the query where the structure can be, best match score); None when nothing matches.

    `cases`: each source case's profile and the structure's extent in it (z_mm, inferior to superior).
    Ranges from every well-matching case are joined.
    """
    ranges, best_score = [], -1.0
    for profile, (z_lo, z_hi) in cases:
        m = match(profile, query)
        if m is None:
            continue
        best_score = max(best_score, m.score)
        if m.score >= MIN_SCORE:
            ranges.append((m.map(z_lo) - margin_mm, m.map(z_hi) + margin_mm))
    if not ranges:
        return None, best_score
    return (min(r[0] for r in ranges), max(r[1] for r in ranges)), best_score
