"""The source document's metrics, computed exactly as DeepMind's surface-distance library does.

Volumetric metrics come from voxel counts. Surface metrics follow DeepMind's
definitions (Nikolov et al. 2021): surface points are the corners of the voxel
lattice whose 2x2x2 neighbourhood is mixed, each carries the area of its
marching-cubes patch on the true (anisotropic) spacing, distances are exact
Euclidean distances between the two corner sets, and every average, fraction
and percentile is weighted by area. MONAI computes the corners, areas and
distances (`get_edge_surface_distance` with sub-voxel surfaces); this module
turns them into the metrics and applies the empty-mask conventions of
`tests/data/metrics/README.md`, so no output is ever NaN or infinite:
undefined ratios are None, infinite distances are None with a flag.

`tests/test_metrics.py` checks every value against DeepMind's own numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from autocontour.overlap import dice

DEFAULT_TOLERANCES_MM = (1.0, 2.0, 3.0)


def metric_keys(tolerances_mm: Sequence[float] = DEFAULT_TOLERANCES_MM) -> list[str]:
    """The keys of a metrics record, in the order of the fixtures' expected.json."""
    return (["dice", "jaccard", "precision", "recall", "rvd", "volume_ref_ml", "volume_pred_ml"]
            + [nsd_key(t) for t in tolerances_mm]
            + ["hd100_mm", "hd95_mm", "asd_ref_to_pred_mm", "asd_pred_to_ref_mm", "assd_mm"])


def nsd_key(tolerance_mm: float) -> str:
    return f"nsd_{tolerance_mm:g}mm"


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """DeepMind's robust Hausdorff for one direction: first distance whose cumulative area reaches percent."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = min(int(np.searchsorted(cumulative, percent / 100.0)), len(order) - 1)
    return float(distances[order][index])


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]):
    """Per surface point: (distance to the other surface, area) for ref->pred and pred->ref."""
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about its own deprecated argument
        # with symmetric=True and use_subvoxels=True MONAI returns (edges, distances, areas) as pairs,
        # which its declared return type (a union over its options) does not say
        found: Any = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred)), torch.from_numpy(np.ascontiguousarray(ref)),
            spacing=[float(s) for s in spacing_mm], use_subvoxels=True, symmetric=True)
        (edges_pred, edges_ref), (d_pred, d_ref), (a_pred, a_ref) = found
    ref_to_pred = (d_ref.double().numpy(), a_ref[edges_ref].double().numpy())
    pred_to_ref = (d_pred.double().numpy(), a_pred[edges_pred].double().numpy())
    return ref_to_pred, pred_to_ref


def compute_metrics(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float],
                    tolerances_mm: Sequence[float] = DEFAULT_TOLERANCES_MM) -> tuple[dict, list[str]]:
    """All metrics for one structure; masks and spacing in the same axis order (e.g. (z, y, x)).

    Returns (metrics, flags). Metric keys are `metric_keys(tolerances_mm)`.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    voxel_ml = float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000
    g, p = int(ref.sum()), int(pred.sum())
    i = int((ref & pred).sum())
    u = g + p - i
    m: dict[str, float | None] = {
        "dice": dice(pred, ref),
        "jaccard": 1.0 if u == 0 else i / u,
        "precision": _ratio(i, p),
        "recall": _ratio(i, g),
        "rvd": 0.0 if g == p == 0 else _ratio(abs(p - g), g),
        "volume_ref_ml": g * voxel_ml,
        "volume_pred_ml": p * voxel_ml,
    }
    flags: list[str] = []
    distance_keys = ["hd100_mm", "hd95_mm", "asd_ref_to_pred_mm", "asd_pred_to_ref_mm", "assd_mm"]
    if g == 0 or p == 0:
        perfect = g == p == 0
        m |= {nsd_key(t): 1.0 if perfect else 0.0 for t in tolerances_mm}
        m |= {k: 0.0 if perfect else None for k in distance_keys}
        if not perfect:
            flags.append(f"{'reference' if g == 0 else 'prediction'} empty: surface distances are infinite (null)")
        return {k: m[k] for k in metric_keys(tolerances_mm)}, flags

    (d_rp, a_r), (d_pr, a_p) = surface_distances(pred, ref, spacing_mm)
    total = a_r.sum() + a_p.sum()
    for t in tolerances_mm:
        m[nsd_key(t)] = float((a_r[d_rp <= t].sum() + a_p[d_pr <= t].sum()) / total)
    m["hd100_mm"] = float(max(d_rp.max(), d_pr.max()))
    m["hd95_mm"] = max(_area_percentile(d_rp, a_r, 95), _area_percentile(d_pr, a_p, 95))
    asd_rp = m["asd_ref_to_pred_mm"] = float((d_rp * a_r).sum() / a_r.sum())
    asd_pr = m["asd_pred_to_ref_mm"] = float((d_pr * a_p).sum() / a_p.sum())
    m["assd_mm"] = (asd_rp + asd_pr) / 2
    return {k: m[k] for k in metric_keys(tolerances_mm)}, flags
