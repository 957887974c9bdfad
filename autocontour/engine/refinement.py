"""Re-propagate a structure after a clinician corrected some of its slices.

A correction is truth, like a drawn slice. What it changes is local: the
slices between it and the neighbouring drawn slices (their support changed),
and of a draft no clinician drew, the slices within a window around it. Only
those are recomputed, so a correction answers in seconds; every other slice
keeps its contour and serves as an anchor: the network is shown the nearest
anchors (drawn slices first at a tie of distance, then the version's own
contours) and the shape interpolation runs between them, so a corrected slice
blends into the untouched draft instead of leaving a step.

An erased slice (a correction that holds nothing) is an end: what lies beyond
it and no longer touches the rest of the structure is removed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from autocontour.engine.propagation import (
    DRAWN,
    PROPAGATED,
    EndStop,
    Propagation,
    PropagationOptions,
    bridging_slice,
    fill_holes,
    interpolation_prior,
    keep_connected_to_drawn,
    network_probability,
    network_views,
    runs,
    walk_end,
)
from autocontour.engine.runner import Engine
from autocontour.io import CanonicalCT
from autocontour.preprocess import PreprocessSpec

DRAFT = 3  # provenance code: a slice of a draft nobody drew (segment's cross-patient result)
DRAFT_WINDOW_MM = 20.0  # a correction re-propagates the draft at most this far on each side


@dataclass(frozen=True)
class Correction:
    """A version of one structure and the slices a clinician just corrected on it (canonical numbering)."""

    current: np.ndarray  # (z, y, x) bool: the version being corrected
    provenance: np.ndarray  # (z,) uint8 codes of that version: DRAWN, PROPAGATED, DRAFT or 0
    corrected: np.ndarray  # (z, y, x) bool: only the corrected slices are read
    slices: tuple[int, ...]  # the corrected canonical slices; a slice holding nothing is erased

    def truth(self) -> tuple[np.ndarray, np.ndarray]:
        """The version with the corrections in place, and its provenance with the corrections drawn."""
        mask, provenance = self.current.copy(), self.provenance.copy()
        index = list(self.slices)
        mask[index], provenance[index] = self.corrected[index], DRAWN
        return mask, provenance


def _reach(provenance: np.ndarray, filled: np.ndarray, start: int, step: int, window: int, extend: int) -> list[int]:
    """Slices from `start` (exclusive) towards `step` that a correction there changes: up to the next drawn
    slice; through a draft at most `window` slices; past the structure's last contour `extend` slices."""
    out, z = [], start + step
    while 0 <= z < len(provenance) and provenance[z] != DRAWN:
        further = filled[z::step].any() if step > 0 else filled[z::-1].any()
        if provenance[z] == DRAFT and abs(z - start) > window:
            break
        if not further and abs(z - start) > extend:
            break
        out.append(z)
        z += step
    return out


def recompute_region(correction: Correction, provenance: np.ndarray, filled: np.ndarray, dz_mm: float,
                     options: PropagationOptions) -> np.ndarray:
    """The slices whose support the correction changed, sorted."""
    window = int(round(DRAFT_WINDOW_MM / dz_mm))
    extend = 0 if options.ends_drawn else int(round(options.max_extension_mm / dz_mm))
    region: set[int] = set()
    for c in correction.slices:
        for step in (-1, 1):
            region.update(_reach(provenance, filled, c, step, window, extend if filled[c] else 0))
    return np.array(sorted(region), dtype=int)


def anchors_around(mask: np.ndarray, provenance: np.ndarray, region: np.ndarray) -> list[int]:
    """Slices that keep their contour and show the network and the interpolation the structure: drawn ones,
    and the version's slices with a contour outside the region (plus the empty slice just past each end)."""
    keep = np.ones(len(provenance), dtype=bool)
    keep[region] = False
    filled = mask.any(axis=(1, 2))
    near = filled | np.roll(filled, 1) | np.roll(filled, -1)
    return [int(z) for z in np.nonzero(keep & (near | (provenance == DRAWN)))[0]]


def _end(mask: np.ndarray, provenance: np.ndarray, side: str) -> EndStop:
    filled = np.nonzero(mask.any(axis=(1, 2)))[0]
    if not len(filled):
        return EndStop(side, 0, "nothing left")
    z = int(filled[0] if side == "inferior" else filled[-1])
    reason = {DRAWN: "drawn", DRAFT: "draft", PROPAGATED: "structure ended"}.get(int(provenance[z]), "structure ended")
    return EndStop(side, z, reason)


def clip_extension(result: np.ndarray, region: np.ndarray, filled_before: np.ndarray, options: PropagationOptions,
                   dz_mm: float) -> None:
    """Beyond the contours the version had, a correction extends the structure only while it goes on."""
    if options.ends_drawn or not len(region) or not filled_before.any():
        return
    limit = int(round(options.max_extension_mm / dz_mm))
    low, high = np.nonzero(filled_before)[0][[0, -1]]
    for start, step in ((int(low), -1), (int(high), 1)):
        if np.isin(start + step, region):
            last, _ = walk_end(result, start, step, limit, options.stop_area_fraction * float(result[start].sum()))
            if step < 0:
                result[:last] = False
            else:
                result[last + 1:] = False


def refine(engine: Engine, ct: CanonicalCT, correction: Correction, options: PropagationOptions | None = None,
           spec: PreprocessSpec | None = None) -> Propagation:
    """The corrected structure: corrections exactly as drawn, the slices they affect re-propagated, the rest
    unchanged. `options.prior_weight` is used as given (no leave-one-out choice: a correction must be quick)."""
    start = time.perf_counter()
    options, spec = replace(options or PropagationOptions(), auto_weight=False), spec or PreprocessSpec()
    truth, provenance = correction.truth()
    dz = ct.spacing_zyx[0]
    filled_before = np.asarray(truth.any(axis=(1, 2)))
    region = recompute_region(correction, provenance, filled_before, dz, options)
    anchors = anchors_around(truth, provenance, region)
    result, fused = truth.copy(), truth.astype(np.float32)
    network = np.zeros(truth.shape, dtype=np.float32)
    shown = [z for z in anchors if truth[z].any()]
    if len(region) and shown:
        views = network_views(ct, truth, shown, options, spec)
        network = np.mean([network_probability(engine, ct, view, anchors, region, options) for view in views], 0)
        prior = interpolation_prior(truth, anchors, ct.spacing_zyx[1:], options.prior_scale_mm)
        inside = (region > min(anchors)) & (region < max(anchors))
        weight = np.where(inside, options.prior_weight, 0.0)[:, None, None]
        fused[region] = (1 - weight) * network[region] + weight * prior[region]
        result[region] = fill_holes(fused > options.threshold, region)[region]
        clip_extension(result, region, filled_before, options, dz)
    result = _connected_to(result, shown)
    result[list(correction.slices)] = truth[list(correction.slices)]
    provenance = _provenance_after(provenance, region, result)
    return Propagation(fused, result, provenance,
                       (_end(result, provenance, "inferior"), _end(result, provenance, "superior")),
                       suggest_next(provenance, result, dz), time.perf_counter() - start, network,
                       options.prior_weight)


def _connected_to(mask: np.ndarray, anchors: Sequence[int]) -> np.ndarray:
    return keep_connected_to_drawn(mask, anchors) if len(anchors) else mask


def _provenance_after(provenance: np.ndarray, region: np.ndarray, result: np.ndarray) -> np.ndarray:
    out = provenance.copy()
    filled = np.asarray(result.any(axis=(1, 2)))
    out[region] = np.where(filled[region], PROPAGATED, 0)
    out[(out != DRAWN) & ~filled] = 0
    return out


def suggest_next(provenance: np.ndarray, mask: np.ndarray, dz_mm: float) -> int | None:
    """Where to correct next: the middle of the longest run of draft slices no correction has reached
    (longer than two windows: nobody has looked there), else the middle of the run of propagated slices
    that the network had to bridge furthest across the most change (length x (1.5 - Dice of the contours
    bounding it)). A correction re-propagates its whole run and halves every slice's distance to a drawn
    one; the probability is no guide here, as only the slices the last edit recomputed still have one
    (the least decided slice always lay next to the last correction: bench/correction_loop.py)."""
    drafts = runs(provenance == DRAFT)
    longest = max(drafts, key=lambda r: r[1] - r[0], default=None)
    if longest is not None and (longest[1] - longest[0] + 1) * dz_mm > 2 * DRAFT_WINDOW_MM:
        return (longest[0] + longest[1]) // 2
    bridging = bridging_slice(provenance, mask)
    if bridging is None and longest is not None:
        return (longest[0] + longest[1]) // 2
    return bridging
