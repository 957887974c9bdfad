"""Stage 5: from probabilities to contours a clinician can review.

Steps, in order, each reported with the voxels it changed:

1. threshold the ensemble-mean probability;
2. fill holes slice by slice (a contour drawn on a slice has no holes);
3. apply the overlap rules (`autocontour.rules`, data a clinic can change): a voxel
   claimed by two structures that may not overlap goes to the one with the
   higher probability;
4. keep the largest connected components (as many as the structure can have
   pieces, each at least a tenth of the largest), dropping stray islands.
   A piece that lies mostly where the registration prior places the structure
   (prior >= 0.5) is not a stray island and is kept whatever its rank: a colon
   cut into a dozen loops by the threshold keeps every loop the registered
   source case shows there.

Then confidence, per slice and per structure, in [0, 1]:

- certainty of a slice: the soft Dice between its probability map p and its
  own thresholded mask m, 2 sum(p m) / (sum p + sum m). A crisp map scores 1; a
  map that hovers near the threshold, or spreads probability outside the
  contour, scores lower;
- agreement of a slice: the mean pairwise Dice between the masks of the
  ensemble members (1 with a single member);
- slice confidence = certainty x agreement; structure confidence = the
  area-weighted mean over the slices with contour.

Slices are flagged for review when their confidence is below
`LOW_CONFIDENCE`, when the contoured area jumps by more than a factor of
`AREA_JUMP` between neighbours, when a slice inside the structure is empty,
and when the structure reaches the edge of the scan or of the searched range.
A one-sided structure (a left kidney) that reaches across the body's
midline gets a warning and its crossing slices flagged.

These are pointers for the reviewer, not guarantees: a confident contour can
still be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from autocontour.rules import OverlapRules

LOW_CONFIDENCE = 0.6
AREA_JUMP = 2.0
MIN_AREA_FOR_JUMP_MM2 = 100.0
MIN_COMPONENT_FRACTION = 0.1
MAX_WRONG_SIDE_FRACTION = 0.1  # of a lateral structure's voxels beyond the midline
SUPPORTED_FRACTION = 0.5  # of a component's voxels inside the prior's likely region: kept whatever its rank


@dataclass
class StructureMask:
    """A structure's final canonical mask and what each step did to it."""

    name: str
    mask: np.ndarray  # canonical (z, y, x) bool
    probability: np.ndarray  # canonical (z, y, x) float32
    changes: dict[str, int] = field(default_factory=dict)  # step -> voxels added (+) or removed (-)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def keep_components(mask: np.ndarray, max_components: int, supported: np.ndarray | None = None) -> np.ndarray:
    """The largest `max_components` pieces (each at least MIN_COMPONENT_FRACTION of the largest), plus every
    piece lying mostly inside `supported` (the registration prior's likely region), however small."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:max_components]
    keep = {i + 1 for i in order if sizes[i] >= MIN_COMPONENT_FRACTION * sizes[order[0]]}
    if supported is not None:
        inside = np.bincount(labels[supported], minlength=n + 1)[1:]
        keep |= {i + 1 for i in np.nonzero(inside >= SUPPORTED_FRACTION * sizes)[0]}
    return np.isin(labels, sorted(keep))


def resolve_overlaps(masks: dict[str, StructureMask], rules: OverlapRules) -> list[dict]:
    """Give each contested voxel to the structure with the higher probability (greedy, per voxel)."""
    if len(masks) < 2:
        return []
    names = list(masks)
    contested = np.nonzero(np.asarray(sum(m.mask.astype(np.int8) for m in masks.values())) > 1)
    if contested[0].size == 0:
        return []
    conflict = np.array([[rules.conflicts(a, b) for b in names] for a in names])
    probs = np.stack([masks[n].probability[contested] for n in names])  # (N, V)
    claims = np.stack([masks[n].mask[contested] for n in names])
    accepted = np.zeros_like(claims)
    voxels = np.arange(claims.shape[1])
    for rank in np.argsort(-probs, axis=0, kind="stable"):  # per voxel, highest probability first
        blocked = (accepted & conflict[rank].T).any(axis=0)
        take = claims[rank, voxels] & ~blocked
        accepted[rank[take], voxels[take]] = True
    changes = []
    for i, name in enumerate(names):
        lost = claims[i] & ~accepted[i]
        if lost.any():
            masks[name].mask[tuple(c[lost] for c in contested)] = False
            winners = {names[j]: int((lost & accepted[j]).sum()) for j in range(len(names))
                       if (lost & accepted[j]).any()}
            changes.append({"structure": name, "voxels_removed": int(lost.sum()), "given_to": winners})
    return changes


def postprocess(probabilities: dict[str, np.ndarray], threshold: float, rules: OverlapRules,
                max_components: dict[str, int], supported: dict[str, np.ndarray] | None = None,
                ) -> tuple[dict[str, StructureMask], list[dict]]:
    """Threshold, fill holes, apply overlap rules, clean components (see the module docstring).

    `supported`: per structure, where its registration prior reaches 0.5 (canonical grid), if it has one."""
    supported = supported or {}
    masks: dict[str, StructureMask] = {}
    for name, p in probabilities.items():
        mask = p >= threshold
        filled = fill_holes_per_slice(mask)
        masks[name] = StructureMask(name, filled, p, {"threshold": int(mask.sum()),
                                                      "holes_filled": int(filled.sum() - mask.sum())})
    rule_changes = resolve_overlaps(masks, rules)
    for change in rule_changes:
        masks[change["structure"]].changes["overlap_rules"] = -change["voxels_removed"]
    for name, m in masks.items():
        kept = keep_components(m.mask, max_components.get(name, 1), supported.get(name))
        m.changes["components_removed"] = -int(m.mask.sum() - kept.sum())
        m.changes.setdefault("overlap_rules", 0)
        m.mask = kept
    return masks, rule_changes


def laterality_warning(mask: np.ndarray, body: np.ndarray, side: str) -> dict | None:
    """A warning when a left or right structure lies across the body midline, with the slices where it does.

    Arrays are canonical LPS (z, y, x): x grows towards the patient's left. The midline of a slice
    is the centre of the body's left-right extent there.
    """
    wrong = np.zeros_like(mask)
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        xs = np.nonzero(body[z].any(axis=0))[0]
        if xs.size == 0:
            continue
        midline = (xs.min() + xs.max()) / 2
        columns = np.arange(mask.shape[2])
        beyond = columns < midline if side == "left" else columns > midline
        wrong[z] = mask[z] & beyond[None, :]
    fraction = float(wrong.sum() / max(mask.sum(), 1))
    if fraction <= MAX_WRONG_SIDE_FRACTION:
        return None
    slices = [int(z) for z in np.nonzero(wrong.any(axis=(1, 2)))[0]
              if wrong[z].sum() > MAX_WRONG_SIDE_FRACTION * mask[z].sum()]
    return {"warning": f"a {side}-sided structure with {100 * fraction:.0f}% of its voxels on the patient's "
                       f"{'right' if side == 'left' else 'left'}: check the side", "slices": slices}


@dataclass
class Confidence:
    structure: float | None  # None when the mask is empty
    per_slice: dict[int, float]  # canonical slice -> confidence, for slices with contour
    flagged: list[dict]


def confidence(mask: np.ndarray, probability: np.ndarray, agreement: np.ndarray, computed: np.ndarray,
               pixel_area_mm2: float) -> Confidence:
    """Per-slice and per-structure confidence and review flags (see the module docstring).

    `agreement` and `computed` are per canonical slice; arrays are canonical (z, y, x).
    """
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    zs = np.nonzero(areas)[0]
    if zs.size == 0:
        return Confidence(None, {}, [])
    per_slice: dict[int, float] = {}
    flagged: list[dict] = []
    for z in zs.tolist():
        p, m = probability[z], mask[z]
        certainty = 2 * float((p * m).sum()) / max(float(p.sum() + m.sum()), 1e-6)
        per_slice[int(z)] = round(min(1.0, certainty) * float(agreement[z]), 4)
    weights = areas[zs].astype(float)
    structure_confidence = float(np.average([per_slice[int(z)] for z in zs], weights=weights))

    def flag(z: int | np.integer, reason: str) -> None:
        flagged.append({"slice": int(z), "reason": reason})

    for z in zs.tolist():
        if per_slice[int(z)] < LOW_CONFIDENCE:
            flag(z, f"low confidence {per_slice[int(z)]:.2f}")
    for z in range(int(zs.min()), int(zs.max())):
        a, b = areas[z] * pixel_area_mm2, areas[z + 1] * pixel_area_mm2
        if a == 0 and z > zs.min():
            flag(z, "empty slice inside the structure")
        elif min(a, b) > 0 and max(a, b) > MIN_AREA_FOR_JUMP_MM2 and max(a, b) / min(a, b) > AREA_JUMP:
            flag(z + 1, f"area changes {a:.0f} -> {b:.0f} mm2 from the slice below")
    ends = {"inferior": int(zs.min()), "superior": int(zs.max())}
    searched = np.nonzero(computed)[0]
    for side, z in ends.items():
        if z in (0, mask.shape[0] - 1):
            flag(z, f"reaches the {side} edge of the scan: the structure may continue beyond it")
        elif searched.size and z in (searched.min(), searched.max()):
            flag(z, f"reaches the {side} end of the searched range")
    flagged.sort(key=lambda f: f["slice"])
    return Confidence(round(structure_confidence, 4), per_slice, flagged)
