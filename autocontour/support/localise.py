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
not a match.

Bone alone confuses the pelvic ring with the rib cage (both are slices with
much bone). The air inside the body is the second landmark: lungs fill the
chest and never the pelvis. Profiles carry both channels, and a match that
puts lung against no lung (LUNG_PRESENT_MM2 against under LUNG_ABSENT_MM2)
on more than MAX_LUNG_MISMATCH of its overlap is no match.

`localise` turns a match into a verdict the engine acts on and the summary
reports: search a window; the structure lies outside the scan (`not_in_scan`,
only when the match is confident); search the whole body (no match, or a
match whose window barely touches the scan); or, for a scan shorter than
MIN_OVERLAP_MM, `too_short`: no profile match can be tried, and a slab of a
few centimetres looks like several levels of the body (a 40 mm upper-abdomen
slab with the arms beside it has the bone area of a pelvic ring), so the
engine draws nothing unless a registration prior places the structure or
the caller asks for every slice; each verdict with its reason.
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
AIR_HU = -400.0
LUNG_PRESENT_MM2 = 3000.0  # a lung base; bowel gas stays below this on adult slices
LUNG_ABSENT_MM2 = 1000.0
MAX_LUNG_MISMATCH = 0.15
CONFIDENT_SCORE = 0.85  # a match this good may say a structure is outside the scan
MIN_INSIDE_FRACTION = 0.25  # of the structure's expected extent, for a window to count


@dataclass(frozen=True)
class Profile:
    """Bone and in-body air area (mm2) per axial position, sampled every SAMPLE_MM from z0_mm upwards.

    `lung` is empty for profiles stored before the channel existed; matching then uses bone alone.
    """

    z0_mm: float
    values: tuple[float, ...]
    lung: tuple[float, ...] = ()

    @property
    def z(self) -> np.ndarray:
        return self.z0_mm + SAMPLE_MM * np.arange(len(self.values))

    def to_dict(self) -> dict:
        data = {"z0_mm": round(self.z0_mm, 3), "step_mm": SAMPLE_MM,
                "bone_area_mm2": [round(v, 1) for v in self.values]}
        if self.lung:
            data["air_area_mm2"] = [round(v, 1) for v in self.lung]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        return cls(float(data["z0_mm"]), tuple(float(v) for v in data["bone_area_mm2"]),
                   tuple(float(v) for v in data.get("air_area_mm2", ())))


def _air_in_body(hu: np.ndarray) -> np.ndarray:
    """(Z,) pixels of air enclosed by the body outline on each slice (lungs, bowel gas)."""
    dense = hu > AIR_HU
    counts = np.zeros(hu.shape[0])
    for z in range(hu.shape[0]):
        labels, n = ndimage.label(dense[z])
        if n == 0:
            continue
        body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1  # the couch is a separate, smaller piece
        counts[z] = (ndimage.binary_fill_holes(body) & ~body).sum()
    return counts


def bone_profile(hu: np.ndarray, spacing_zyx, z_mm: np.ndarray) -> Profile:
    """The bone and air profile of a canonical (z, y, x) CT whose slices lie at z_mm (increasing)."""
    step = max(1, int(round(2.0 / float(spacing_zyx[1]))))  # air areas need no sub-2 mm pixels
    pixel_mm2 = float(spacing_zyx[1] * spacing_zyx[2])
    bone = (hu > BONE_HU).reshape(hu.shape[0], -1).sum(axis=1) * pixel_mm2
    air = _air_in_body(hu[:, ::step, ::step]) * pixel_mm2 * step * step
    grid = np.arange(z_mm[0], z_mm[-1] + 1e-6, SAMPLE_MM)

    def resample(area: np.ndarray) -> tuple[float, ...]:
        smooth = ndimage.gaussian_filter1d(np.interp(grid, z_mm, area), SMOOTH_MM / SAMPLE_MM)
        return tuple(float(v) for v in smooth)

    return Profile(float(grid[0]), resample(bone), resample(air))


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
            if source.lung and query.lung and _lung_mismatch(
                    np.asarray(source.lung)[inside], np.interp(mapped[inside], qz, np.asarray(query.lung))):
                continue
            score = float(np.corrcoef(a, b)[0, 1])
            if best is None or score > best.score:
                best = Match(float(scale), float(shift), score)
    return best


def _lung_mismatch(a: np.ndarray, b: np.ndarray) -> bool:
    """Lung on one side and none on the other over too much of the overlap."""
    wrong = ((a > LUNG_PRESENT_MM2) & (b < LUNG_ABSENT_MM2)) | ((b > LUNG_PRESENT_MM2) & (a < LUNG_ABSENT_MM2))
    return bool(wrong.mean() > MAX_LUNG_MISMATCH)


@dataclass(frozen=True)
class Localisation:
    """Where the engine searches one structure, and why.

    verdict: "window" (search `window_mm`), "not_in_scan" (the structure's expected extent lies
    outside the scan: nothing is drawn), "whole_body" (no trustworthy match: every body slice) or
    "too_short" (the scan is too short to place: nothing is drawn).
    """

    verdict: str
    reason: str | None = None
    window_mm: tuple[float, float] | None = None
    expected_mm: tuple[float, float] | None = None
    score: float | None = None


def localise(cases: list[tuple[Profile, tuple[float, float]]], query: Profile,
             scan_mm: tuple[float, float], margin_mm: float = MARGIN_MM) -> Localisation:
    """Decide where to search: see `Localisation`.

    Each source case's structure extent is mapped through its match; the cases that match join.
    The window counts when the scan holds at least MIN_INSIDE_FRACTION of the expected extent
    (a window that only grazes the scan is more likely a wrong match than a structure at its edge).
    A confident match (score >= CONFIDENT_SCORE) that puts the whole extent outside the scan
    says the structure is not there; anything less searches the whole body.
    """
    if not cases:
        return Localisation("whole_body", "the support set has no bone profiles: the whole body was searched")
    length = scan_mm[1] - scan_mm[0]
    if length < MIN_OVERLAP_MM:
        return Localisation("too_short", f"the scan is {length:.0f} mm long, too short to tell which part of the "
                                         f"body it shows (the skeleton match needs {MIN_OVERLAP_MM:.0f} mm): "
                                         "nothing was searched; axial search 'all' (CLI --axial-search all, "
                                         "HTTP axial_search=all) searches every slice")
    expected, best = [], -1.0
    for profile, (z_lo, z_hi) in cases:
        m = match(profile, query)
        if m is None:
            continue
        best = max(best, m.score)
        if m.score >= MIN_SCORE:
            expected.append((m.map(z_lo), m.map(z_hi), m.score))
    if not expected:
        why = "no source case's skeleton matched the scan's" + (f" (best r = {best:.2f})" if best > -1 else "")
        return Localisation("whole_body", why + ": the whole body was searched", score=best if best > -1 else None)
    lo, hi = min(e[0] for e in expected), max(e[1] for e in expected)
    score = max(e[2] for e in expected)
    inside = max(0.0, min(hi, scan_mm[1]) - max(lo, scan_mm[0]))
    span = f"z {lo:.0f} to {hi:.0f} mm; the scan spans {scan_mm[0]:.0f} to {scan_mm[1]:.0f} mm"
    if inside >= MIN_INSIDE_FRACTION * max(hi - lo, SAMPLE_MM):
        return Localisation("window", None, (lo - margin_mm, hi + margin_mm), (lo, hi), score)
    if inside == 0 and score >= CONFIDENT_SCORE:
        return Localisation("not_in_scan", f"the skeleton match (r = {score:.2f}) puts it at {span}",
                            None, (lo, hi), score)
    return Localisation("whole_body", f"the skeleton match (r = {score:.2f}) put it mostly outside the scan "
                                      f"({span}); the match was not trusted: the whole body was searched",
                        None, (lo, hi), score)
