"""Which examples each query slice is segmented from: the support subsets of the passes.

The coarse pass draws a subset spread over the structure's whole extent (`spread_members`); the fine pass
draws the examples nearest the query's own relative level (`level_members`), from the source cases whose
slices there look most like the query (`thumbnails`, normalised cross-correlation of the 32x32 model
images). A query on a scan that is itself a source case never sees its own slice or its neighbours
(`allowed`, leave-slice-out).
"""

from __future__ import annotations

import numpy as np

from autocontour.support.store import SupportSet

LEAVE_OUT_RADIUS = 1  # slices either side of the query excluded when the CT is a source case


class SupportPool:
    """All structures' support slices in one array, so one batch can mix structures."""

    def __init__(self, supports: dict[str, SupportSet], crops: bool = False):
        """`crops`: also `crop_array`, the sets' structure-centred crops at the same offsets (the whole view
        for sets without crops)."""
        self.offset: dict[str, int] = {}
        arrays, crop_arrays, total = [], [], 0
        for name, support in supports.items():
            self.offset[name] = total
            arrays.append(np.stack([support.images, support.labels], axis=1))
            crop_images, crop_labels = support.crop_images, support.crop_labels
            if crops:
                crop_arrays.append(arrays[-1] if crop_images is None or crop_labels is None else
                                   np.stack([crop_images, crop_labels], axis=1))
            total += len(support)
        self.array = np.concatenate(arrays).astype(np.float32)
        self.crop_array = np.concatenate(crop_arrays).astype(np.float32) if crops else self.array


def spread_members(levels: np.ndarray, allowed: np.ndarray, s: int, k: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """K support subsets stratified over the levels: one pick per stratum each."""
    order = np.nonzero(allowed)[0]
    order = order[np.argsort(levels[order], kind="stable")]
    strata = np.array_split(order, s)
    members = []
    for member in range(k):
        picks = [stratum[len(stratum) // 2] if member == 0 else rng.choice(stratum) for stratum in strata]
        members.append(np.array(picks, dtype=np.int64))
    return members


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, 32*32) zero-mean, unit-norm thumbnails of model images, for normalised cross-correlation."""
    n, h, w = images.shape
    small = images.reshape(n, 32, h // 32, 32, w // 32).mean(axis=(2, 4)).reshape(n, -1)
    small = small - small.mean(axis=1, keepdims=True)
    return small / (np.linalg.norm(small, axis=1, keepdims=True) + 1e-6)


def _by_matching_case(nearest: np.ndarray, cases: np.ndarray, similarity: np.ndarray, s: int) -> np.ndarray:
    """The nearest-level candidates reordered so the source cases most like the query come first.

    A case's score is the mean similarity of its candidates among the 3S nearest; within a case
    the order by level is kept.
    """
    pool = nearest[: 3 * s]
    scores = {c: similarity[pool[cases[pool] == c]].mean() for c in np.unique(cases[pool])}
    rank = np.array([-scores[c] for c in cases[pool]])
    return np.concatenate([pool[np.argsort(rank, kind="stable")], nearest[3 * s:]])


def level_members(levels: np.ndarray, allowed: np.ndarray, level: float, s: int, k: int,
                   rng: np.random.Generator, cases: np.ndarray | None = None,
                   similarity: np.ndarray | None = None) -> list[np.ndarray]:
    """K support subsets from the examples nearest the query's level (from the best-matching cases)."""
    candidates = np.nonzero(allowed)[0]
    nearest = candidates[np.argsort(np.abs(levels[candidates] - level), kind="stable")]
    if cases is not None and similarity is not None:
        nearest = _by_matching_case(nearest, cases, similarity, s)
    pool = nearest[: min(nearest.size, 2 * s)]
    members = [nearest[:s]]
    for _ in range(1, k):
        members.append(np.sort(rng.choice(pool, size=s, replace=False)))
    return members


def allowed_slices(support: SupportSet, z: int, own_cases: set[str]) -> np.ndarray:
    """Support slices a query at canonical slice z may use (leave-slice-out for source cases)."""
    allowed = np.ones(len(support), dtype=bool)
    if own_cases:
        for i, meta in enumerate(support.manifest.slices):
            if meta.case in own_cases and abs(meta.slice_index - z) <= LEAVE_OUT_RADIUS:
                allowed[i] = False
    return allowed
