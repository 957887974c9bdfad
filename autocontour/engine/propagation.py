"""Propagate a structure from the few slices a planner drew on this patient's own CT.

A planner who draws a structure on a handful of axial slices has given the
best support set there is: the same patient, scanner, contrast and anatomy.
UniverSeg segments every other slice the way those drawn slices show, and
the drawn slices themselves are the truth: they are never predicted, never
left out, and come back exactly as drawn.

Between drawn slices the network decides, helped by what planning systems
already do there: the shape-based (signed-distance) interpolation of the
neighbouring drawn slices is fused with the network's probability as a prior.
The network sees the anatomy (a kidney pole that bends, a cord that moves);
the interpolation keeps the shape where the image is ambiguous.

Beyond the outermost drawn slices (unless `ends_drawn`) the network goes on
slice by slice while the structure goes on: it stops where the predicted
area collapses or loses touch with the previous slice, at a bound, or at the
scan's edge, and says which.

Small structures on coarse grids are lost in a whole-body 128 px view (a
spinal cord is three pixels wide there), so by default both the drawn slices
and the queries are seen on a square crop centred on the drawn contours, with
the context margin the support sets' crops use (the shipped v2 weights were
trained on such crops too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from autocontour.engine.runner import Engine
from autocontour.evaluation.interpolation import interpolated_distance
from autocontour.evaluation.metrics import dice
from autocontour.io import CanonicalCT
from autocontour.preprocess import (
    ModelInput,
    PreprocessSpec,
    body_mask,
    grid_to_canonical,
    mask_centre_mm,
    mask_to_grid,
    prepare,
    prepare_crop,
)

DRAWN, PROPAGATED = 1, 2  # provenance codes; 0: nothing there
CROP_MARGIN_FRACTION, CROP_MIN_MARGIN_MM = 0.25, 15.0  # as the support sets' crops (support/build.py)


@dataclass(frozen=True)
class PropagationOptions:
    """How far to trust the network, the interpolation prior and the drawn extent.

    Defaults are the variant kept on bench/propagation.py (see its docstring).
    """

    ends_drawn: bool = True  # the drawn slices include both ends: nothing beyond them
    crop: bool = True  # look at a crop centred on the drawn contours, not the whole-body view
    whole_view: bool = False  # also the whole-body view, averaged with the crop's (an ensemble of two scales)
    crop_min_voxels: float = 32.0  # the crop spans at least this many CT voxels: context on coarse grids
    support_size: int = 16  # most examples per query: drawn slices nearest the query first, then mirrored ones
    flips: bool = True  # left-right mirrored drawn slices as extra examples (more support for small k)
    prior_weight: float = 0.5  # weight of the shape-interpolation prior between drawn slices (0: network only)
    prior_scale_mm: float = 2.0  # softness of the prior's edge: logistic of the signed distance
    threshold: float = 0.5
    max_extension_mm: float = 60.0  # beyond an undrawn end the network goes at most this far
    stop_area_fraction: float = 0.05  # an extension slice smaller than this share of the end's area ends it
    next_rule: str = "uncertainty"  # how `next_slice` is chosen: a key of NEXT_RULES (bench: finds the worst slices)
    auto_weight: bool = True  # choose prior_weight per structure by leaving out each inner drawn slice
    refine: int = 0  # second pass: this many of the first pass's nearest propagated slices join each query's
    # support as pseudo-labels (0: one pass). Drawn examples always stay in the support.


@dataclass(frozen=True)
class EndStop:
    """Where one end of the structure stopped and why ("drawn", "structure ended", "limit", "scan edge")."""

    side: str  # "inferior" (towards lower z) or "superior"
    last_slice: int  # the outermost slice holding the structure on that side
    reason: str


@dataclass
class Propagation:
    """A propagated structure on the canonical grid, and where each slice's contour came from."""

    probability: np.ndarray  # (z, y, x) float32; drawn slices are 0/1 exactly
    mask: np.ndarray  # (z, y, x) bool
    provenance: np.ndarray  # (z,) uint8: DRAWN, PROPAGATED, or 0 (nothing drawn or predicted there)
    ends: tuple[EndStop, EndStop]
    next_slice: int | None  # where a drawn correction would help most next (None: nothing propagated)
    seconds: float = 0.0
    network: np.ndarray | None = field(default=None, repr=False)  # the network's own probability (canonical)
    prior_weight: float | None = None  # the interpolation prior's weight used (chosen, with auto_weight)

    @property
    def propagated_slices(self) -> np.ndarray:
        return np.nonzero(self.provenance == PROPAGATED)[0]


@dataclass
class _View:
    """The scan as the network sees it (crop or whole view) and the drawn labels on that grid."""

    input: ModelInput
    labels: np.ndarray  # (Z, size, size) uint8, only drawn slices filled


def crop_side_mm(mask: np.ndarray, drawn: Sequence[int], spacing_yx: Sequence[float], min_voxels: float) -> float:
    """Square side around the drawn contours: their in-plane extent plus the support crops' margin, and
    at least `min_voxels` CT voxels (a 4.7 mm grid blown up 15 times shows the network nothing but blur)."""
    _, ys, xs = np.nonzero(mask[list(drawn)])
    extent = max((ys.max() - ys.min() + 1) * spacing_yx[0], (xs.max() - xs.min() + 1) * spacing_yx[1])
    side = extent + 2 * max(CROP_MIN_MARGIN_MM, CROP_MARGIN_FRACTION * extent)
    return float(max(side, min_voxels * max(spacing_yx)))


def network_views(ct: CanonicalCT, mask: np.ndarray, drawn: Sequence[int], options: PropagationOptions,
                  spec: PreprocessSpec) -> list[_View]:
    """The views the network looks through: the crop around the drawn contours, the whole view, or both."""
    crops = [True] if options.crop else []
    crops += [False] if options.whole_view or not options.crop else []
    return [network_view(ct, mask, drawn, crop, options, spec) for crop in crops]


def network_view(ct: CanonicalCT, mask: np.ndarray, drawn: Sequence[int], crop: bool, options: PropagationOptions,
                 spec: PreprocessSpec) -> _View:
    """Prepare the scan on the crop around the drawn contours (or the whole view) with the drawn labels."""
    drawn_only = np.zeros(mask.shape, dtype=np.uint8)
    drawn_only[list(drawn)] = mask[list(drawn)]
    if crop:
        spacing_yx = ct.spacing_zyx[1:]
        centre = mask_centre_mm(drawn_only, ct.image)
        view = prepare_crop(ct, spec, centre, crop_side_mm(mask, drawn, spacing_yx, options.crop_min_voxels),
                            np.ones(mask.shape[0], dtype=bool))
    else:
        view = prepare(ct, spec, body_mask(ct, spec.body_threshold_hu))
    return _View(view, mask_to_grid(drawn_only, ct, view.grid))


def query_slices(drawn: Sequence[int], num_slices: int, dz_mm: float, options: PropagationOptions) -> np.ndarray:
    """Slices the network segments: every undrawn one between the drawn ends, and (ends not drawn) a
    bounded run beyond each."""
    low, high = min(drawn), max(drawn)
    if not options.ends_drawn:
        reach = int(round(options.max_extension_mm / dz_mm))
        low, high = max(0, low - reach), min(num_slices - 1, high + reach)
    return np.setdiff1d(np.arange(low, high + 1), np.asarray(drawn))


def support_pool(view: _View, drawn: Sequence[int], flips: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, H, W) [image, label] examples from the drawn slices (and their mirror images), with each
    example's slice index."""
    images, labels = view.input.images[list(drawn)], view.labels[list(drawn)].astype(np.float32)
    pool = np.stack([images, labels], axis=1)
    z = np.asarray(drawn)
    if flips:
        pool = np.concatenate([pool, pool[..., ::-1]])
        z = np.concatenate([z, z])
    return np.ascontiguousarray(pool, dtype=np.float32), z


def support_index(queries: np.ndarray, pool_z: np.ndarray, size: int) -> np.ndarray:
    """Per query, the `size` examples whose slices lie nearest it (originals before mirrors at a tie),
    never the query's own slice."""
    size = min(size, len(pool_z) - int(np.isin(queries, pool_z).any()))
    distance = np.abs(queries[:, None] - pool_z[None, :]) + np.arange(len(pool_z))[None, :] * 1e-3
    distance[distance < 0.5] = np.inf
    return np.argsort(distance, axis=1, kind="stable")[:, :size]


def network_probability(engine: Engine, ct: CanonicalCT, view: _View, drawn: Sequence[int], queries: np.ndarray,
                        options: PropagationOptions, pseudo: np.ndarray | None = None) -> np.ndarray:
    """The network's canonical (z, y, x) probability on the query slices (zero elsewhere).

    `pseudo`: a first pass's canonical mask; its propagated slices nearest each query join the drawn ones
    in the support (`options.refine` of them).
    """
    stack = np.zeros(view.input.images.shape, dtype=np.float32)
    if not len(queries):
        return grid_to_canonical(stack, view.input, ct)
    pool, pool_z = support_pool(view, drawn, options.flips)
    index = support_index(queries, pool_z, options.support_size)
    if pseudo is not None and options.refine:
        slices = np.setdiff1d(np.nonzero(pseudo.any(axis=(1, 2)))[0], drawn)
        if len(slices) > options.refine:
            labels = mask_to_grid(pseudo, ct, view.input.grid).astype(np.float32)
            extra = np.stack([view.input.images[slices], labels[slices]], axis=1)
            near = support_index(queries, slices, options.refine) + len(pool)
            pool, index = np.concatenate([pool, extra]), np.concatenate([index, near], axis=1)
    stack[queries] = engine.predict(view.input.images[queries], np.ascontiguousarray(pool), index)
    return grid_to_canonical(stack, view.input, ct)


def interpolation_prior(mask: np.ndarray, drawn: Sequence[int], spacing_yx: Sequence[float],
                        scale_mm: float) -> np.ndarray:
    """Shape-interpolation between drawn slices as a soft probability (logistic of the signed distance)."""
    distance = interpolated_distance(mask, drawn, spacing_yx)
    return (1.0 / (1.0 + np.exp(np.clip(distance / scale_mm, -50, 50)))).astype(np.float32)


def fuse(network: np.ndarray, prior: np.ndarray, drawn: Sequence[int], weight: float) -> np.ndarray:
    """Blend the prior into the network between the drawn ends; beyond them the network alone."""
    fused = network.copy()
    low, high = min(drawn), max(drawn)
    fused[low:high + 1] = (1 - weight) * network[low:high + 1] + weight * prior[low:high + 1]
    return fused


def walk_end(mask: np.ndarray, start: int, step: int, limit: int, min_area: float) -> tuple[int, str]:
    """From a drawn end, follow the predicted structure outward one slice at a time.

    Returns the last slice kept and why the walk stopped. A slice continues the
    structure if it is large enough and overlaps the previous kept slice.
    """
    z, previous = start, mask[start]
    while True:
        nxt = z + step
        if nxt < 0 or nxt >= mask.shape[0]:
            return z, "scan edge"
        if abs(nxt - start) > limit:
            return z, "limit"
        here = mask[nxt]
        if here.sum() < max(1.0, min_area) or not (here & ndimage.binary_dilation(previous)).any():
            return z, "structure ended"
        z, previous = nxt, here


def bound_ends(mask: np.ndarray, drawn: Sequence[int], options: PropagationOptions,
               dz_mm: float) -> tuple[EndStop, EndStop]:
    """Decide each end (and clear the mask beyond it)."""
    low, high = min(drawn), max(drawn)
    if options.ends_drawn:
        mask[:low] = False
        mask[high + 1:] = False
        return EndStop("inferior", low, "drawn"), EndStop("superior", high, "drawn")
    limit = int(round(options.max_extension_mm / dz_mm))
    ends = []
    for side, start, step in (("inferior", low, -1), ("superior", high, 1)):
        area = options.stop_area_fraction * float(mask[start].sum())
        last, reason = walk_end(mask, start, step, limit, area)
        ends.append(EndStop(side, last, reason))
    mask[:ends[0].last_slice] = False
    mask[ends[1].last_slice + 1:] = False
    return ends[0], ends[1]


def keep_connected_to_drawn(mask: np.ndarray, drawn: Sequence[int]) -> np.ndarray:
    """Only the 3D pieces that touch a drawn contour: the planner's structure, not a look-alike beside it."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask
    touched = np.unique(labels[list(drawn)])
    return np.isin(labels, touched[touched > 0])


def fill_holes(mask: np.ndarray, slices: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for z in slices:
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # prior weights the leave-one-out check chooses from


def leave_one_out_weight(engine: Engine, ct: CanonicalCT, views: list[_View], mask: np.ndarray, drawn: list[int],
                         options: PropagationOptions) -> float:
    """The prior weight that best redraws the inner drawn slices from the others.

    Each inner drawn slice is segmented by the network from the other drawn
    slices and interpolated between its drawn neighbours; the weight whose fusion
    matches the drawn contours best wins. The truth used is only what the planner
    drew, so the choice is the patient's and the structure's own. With no inner
    drawn slice (k <= 2) the default weight stays.
    """
    inner = drawn[1:-1]
    if not inner:
        return options.prior_weight
    scores = np.zeros(len(WEIGHTS))
    spacing_yx = ct.spacing_zyx[1:]
    for z in inner:
        others = [d for d in drawn if d != z]
        query = np.array([z])
        network = np.mean([network_probability(engine, ct, view, others, query, options)[z] for view in views], 0)
        prior = interpolation_prior(mask, others, spacing_yx, options.prior_scale_mm)[z]
        scores += [dice((1 - w) * network + w * prior > options.threshold, mask[z]) for w in WEIGHTS]
    best = np.flatnonzero(scores >= scores.max() - 1e-9)
    return float(WEIGHTS[best[np.argmin(np.abs(np.asarray(WEIGHTS)[best] - options.prior_weight))]])


def decide(network: np.ndarray, prior: np.ndarray, mask: np.ndarray, drawn: list[int], queries: np.ndarray,
           options: PropagationOptions, dz_mm: float) -> tuple[np.ndarray, np.ndarray, tuple[EndStop, EndStop]]:
    """Fused probability, mask and ends from the network's probability and the interpolation prior."""
    fused = fuse(network, prior, drawn, options.prior_weight)
    fused[drawn] = mask[drawn]
    result = fill_holes(fused > options.threshold, queries)
    result[drawn] = mask[drawn]
    ends = bound_ends(result, drawn, options, dz_mm)
    result = keep_connected_to_drawn(result, drawn)
    result[drawn] = mask[drawn]
    return fused, result, ends


def _uncertainty(z: int, network: np.ndarray, fused: np.ndarray, prior_mask: np.ndarray, nearest: int) -> float:
    """How undecided the fused probability is on the slice, per voxel of the structure there."""
    p = fused[z]
    return float((4 * p * (1 - p)).sum() / max(1.0, float((p > 0.5).sum())))


def _disagreement(z: int, network: np.ndarray, fused: np.ndarray, prior_mask: np.ndarray, nearest: int) -> float:
    """Network against shape interpolation: where they disagree one of them is wrong (beyond the drawn
    ends, where there is no interpolation, the uncertainty)."""
    if not prior_mask[z].any():
        return _uncertainty(z, network, fused, prior_mask, nearest)
    return 1.0 - dice(network[z] > 0.5, prior_mask[z])


def _farthest(z: int, network: np.ndarray, fused: np.ndarray, prior_mask: np.ndarray, nearest: int) -> float:
    """The slice farthest from any drawn one: the classic planner's rule."""
    return float(nearest)


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive true slices."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return [(int(a), int(b) - 1) for a, b in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0], strict=True)]


def _run_change(mask: np.ndarray, run: tuple[int, int]) -> float:
    """How much the structure changes across a run of propagated slices: 1 - Dice of the contours just
    outside it (1 where the run is open at an end: nothing bounds it there)."""
    low, high = run[0] - 1, run[1] + 1
    if low < 0 or high >= len(mask) or not mask[low].any() or not mask[high].any():
        return 1.0
    return 1.0 - dice(mask[low], mask[high])


def bridging_slice(provenance: np.ndarray, mask: np.ndarray) -> int | None:
    """The middle of the run of propagated slices the network bridged furthest across the most change (length
    x (1.5 - Dice of the contours bounding it)): a correction there halves the most slices' distance to a drawn
    one where the shape changes most (bench/correction_loop.py)."""
    propagated = runs(provenance == PROPAGATED)
    if not propagated:
        return None
    best = max(propagated, key=lambda r: (r[1] - r[0] + 1) * (0.5 + _run_change(mask, r)))
    return (best[0] + best[1]) // 2


NEXT_RULES: dict[str, Callable[[int, np.ndarray, np.ndarray, np.ndarray, int], float]] = {
    "uncertainty": _uncertainty, "disagreement": _disagreement, "farthest": _farthest}
BRIDGE = "bridge"  # bridging_slice: chosen on the whole result, not scored slice by slice


def next_slice(rule: str, propagated: np.ndarray, drawn: Sequence[int], network: np.ndarray, fused: np.ndarray,
               prior_mask: np.ndarray) -> int | None:
    """The propagated slice where the rule expects a drawn correction to help most."""
    if not len(propagated):
        return None
    score = NEXT_RULES[rule]
    nearest = np.abs(propagated[:, None] - np.asarray(drawn)[None, :]).min(axis=1)
    scores = [score(int(z), network, fused, prior_mask, int(d)) for z, d in zip(propagated, nearest, strict=True)]
    return int(propagated[int(np.argmax(scores))])


def _check(mask: np.ndarray, drawn: Sequence[int], ct: CanonicalCT, options: PropagationOptions) -> list[int]:
    if mask.shape != ct.array.shape:
        raise ValueError(f"mask {mask.shape} is not on the canonical CT grid {ct.array.shape}")
    index = sorted({int(z) for z in drawn})
    if not index or index[0] < 0 or index[-1] >= mask.shape[0]:
        raise ValueError("drawn slices must be canonical axial indices inside the scan, at least one")
    if not mask[index].any():
        raise ValueError("nothing is drawn on the drawn slices")
    if options.next_rule not in {*NEXT_RULES, BRIDGE}:
        raise ValueError(f"next_rule must be one of {', '.join([*NEXT_RULES, BRIDGE])}")
    return index


def propagate(engine: Engine, ct: CanonicalCT, mask: np.ndarray, drawn: Sequence[int],
              options: PropagationOptions | None = None, spec: PreprocessSpec | None = None) -> Propagation:
    """Segment one structure on every slice of `ct` from its contours on the `drawn` canonical slices.

    `mask` is canonical (z, y, x); only its drawn slices are read. The drawn
    slices come back exactly as drawn and are the whole support set.
    """
    start = time.perf_counter()
    options, spec = options or PropagationOptions(), spec or PreprocessSpec()
    mask = np.asarray(mask, dtype=bool)
    index = _check(mask, drawn, ct, options)
    dz, spacing_yx = ct.spacing_zyx[0], ct.spacing_zyx[1:]
    queries = query_slices(index, mask.shape[0], dz, options)
    views = network_views(ct, mask, index, options, spec)
    prior = interpolation_prior(mask, index, spacing_yx, options.prior_scale_mm)
    if options.auto_weight:
        options = replace(options, prior_weight=leave_one_out_weight(engine, ct, views, mask, index, options))
    pseudo = None
    for _ in range(2 if options.refine else 1):
        network = np.mean([network_probability(engine, ct, view, index, queries, options, pseudo)
                           for view in views], axis=0)
        fused, result, ends = decide(network, prior, mask, index, queries, options, dz)
        pseudo = result
    fused[:ends[0].last_slice] = 0.0
    fused[ends[1].last_slice + 1:] = 0.0
    provenance = np.zeros(mask.shape[0], dtype=np.uint8)
    provenance[ends[0].last_slice:ends[1].last_slice + 1] = PROPAGATED
    provenance[index] = DRAWN
    propagated = np.nonzero(provenance == PROPAGATED)[0]
    upcoming = (bridging_slice(provenance, result) if options.next_rule == BRIDGE else
                next_slice(options.next_rule, propagated, index, network, fused, prior > 0.5))
    return Propagation(fused, result, provenance, ends, upcoming, time.perf_counter() - start, network,
                       options.prior_weight)
