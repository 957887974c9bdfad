"""Three planes, one answer: the fine pass again on coronal and sagittal cuts (`planes="three"`).

An axial slice shows a structure in cross-section; its superior and inferior ends, where axial
contours go most wrong, a coronal or sagittal cut shows side-on. UniverSeg was trained on all three
planes (the paper; our checkpoint too, autocontour.training.data). Here the query's cuts come from the fine
pass's whole-body view (`ModelInput`, the same pixels the axial pass sees), resampled along z onto a
square window of the view's pixel size centred on the structure, so a cut shows the structure at the
scale the axial view does. The examples are cut the same way from the set's atlas copies (its source
cases at about 4 mm, format 2), prepared with the set's own recipe. Each query cut takes the S
examples nearest its relative position across the structure.

The probabilities of the three planes are averaged on the searched slices (the axial one alone
where a cut's window does not reach), before the registration prior is fused. Cuts are taken only
across the structure's likely region (the axial pass's mask and the prior's, plus a margin); the
planes add nothing beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from autocontour.io import CanonicalCT
from autocontour.preprocess import ModelInput, PreprocessSpec, mask_to_grid, prepare
from autocontour.support.registration import MASK_SCALE, AtlasCase

OTHER_PLANES = ("coronal", "sagittal")
PLANE_MARGIN_MM = 10.0  # cut this far beyond the likely region on either side


def window_rows_mm(centre_mm: float, pixel_mm: float, size: int) -> np.ndarray:
    """z (mm) of each row of a cut: a square of `size` pixels of `pixel_mm` centred on `centre_mm`, superior
    row first (as the training cuts show it)."""
    return centre_mm + (size / 2 - 0.5 - np.arange(size)) * pixel_mm


def _interpolation(z_mm: np.ndarray, targets_mm: np.ndarray,
                   reach: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower index, weight of the upper one and validity for linear interpolation of `targets_mm` among
    equally spaced, increasing `z_mm`; targets up to `reach` steps beyond the ends take the end value."""
    step = z_mm[1] - z_mm[0]
    position = (targets_mm - z_mm[0]) / step
    valid = (position >= -reach - 1e-6) & (position <= len(z_mm) - 1 + reach + 1e-6)
    position = np.clip(position, 0, len(z_mm) - 1)
    lower = np.minimum(np.floor(position).astype(int), len(z_mm) - 2)
    return lower, position - lower, valid


def _sheets(volume: np.ndarray, plane: str, positions: np.ndarray) -> np.ndarray:
    """(N, Z, W) planes of a (Z, H, W) volume: rows y (coronal) or columns x (sagittal) at `positions`."""
    if plane == "coronal":
        return np.moveaxis(volume[:, positions, :], 1, 0)
    return np.moveaxis(volume[:, :, positions], 2, 0)


def cut(volume: np.ndarray, z_mm: np.ndarray, plane: str, positions: np.ndarray,
        rows_mm: np.ndarray) -> np.ndarray:
    """(N, len(rows_mm), W) cuts of a (Z, H, W) volume whose slices lie at `z_mm`: each row linearly
    interpolated along z; the end slices reach half a slice beyond their centres (a voxel's extent), and
    beyond that the cut is zero."""
    sheets = _sheets(volume, plane, positions).astype(np.float32)
    lower, weight, valid = _interpolation(z_mm, rows_mm, reach=0.5)
    weight = weight[None, :, None].astype(np.float32)
    out = sheets[:, lower] * (1 - weight) + sheets[:, lower + 1] * weight
    out[:, ~valid] = 0.0
    return out


def uncut(cuts: np.ndarray, rows_mm: np.ndarray, plane: str, positions: np.ndarray, z_mm: np.ndarray,
          shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `cut`: a (Z, H, W) volume (zero beyond `positions`) and the (Z,) slices the window
    reached."""
    volume = np.zeros(shape, dtype=np.float32)
    # rows_mm decreases; interpolate in increasing order
    lower, weight, covered = _interpolation(rows_mm[::-1], z_mm)
    slices = np.nonzero(covered)[0]
    rows = cuts[:, ::-1]
    w = weight[slices][None, :, None].astype(np.float32)
    values = rows[:, lower[slices]] * (1 - w) + rows[:, lower[slices] + 1] * w  # (N, K, W)
    if plane == "coronal":
        volume[slices[:, None], positions[None, :], :] = values.transpose(1, 0, 2)
    else:
        volume[slices[:, None], :, positions[None, :]] = values.transpose(1, 0, 2)
    return volume, covered


def slice_z_mm(model_input: ModelInput) -> np.ndarray:
    """z (mm) of each slice of a model input."""
    grid = model_input.grid
    return grid.GetOrigin()[2] + grid.GetSpacing()[2] * np.arange(model_input.num_slices)


def _across(region: np.ndarray, plane: str) -> np.ndarray:
    """(H,) or (W,) bool: the rows (coronal) or columns (sagittal) the region reaches."""
    return np.asarray(region.any(axis=(0, 2) if plane == "coronal" else (0, 1)))


def _levels(positions: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Each position's place across the region: 0 at its first row or column, 1 at its last."""
    first, last = np.nonzero(reached)[0][[0, -1]]
    return (positions - first) / max(int(last - first), 1)


def _z_centre(region: np.ndarray, z_mm: np.ndarray) -> float:
    slices = np.nonzero(region.any(axis=(1, 2)))[0]
    return float(z_mm[slices[0]] + z_mm[slices[-1]]) / 2


@dataclass
class Examples:
    """A set's examples in one plane: cuts of its source cases' atlas copies through the structure."""

    images: np.ndarray  # (N, size, size) float32 in [0, 1]
    labels: np.ndarray  # (N, size, size) float32 0/1
    levels: np.ndarray  # (N,) position across the structure: 0 first, 1 last row or column


def atlas_examples(atlas: AtlasCase, spec: PreprocessSpec, plane: str) -> Examples | None:
    """Every cut of one atlas copy that shows the structure, on the whole-body view its recipe gives."""
    ct = CanonicalCT(sitk.Cast(atlas.ct, sitk.sitkFloat32))  # int16 on disk; the recipe works in float HU
    if ct.array.shape[0] < 2:
        return None
    view = prepare(ct, spec)
    occupancy = ct.to_canonical(atlas.mask).astype(np.float32) / MASK_SCALE
    mask = mask_to_grid(occupancy, ct, view.grid).astype(bool)
    if not mask.any():
        return None
    z_mm = slice_z_mm(view)
    rows_mm = window_rows_mm(_z_centre(mask, z_mm), view.pixel_mm, spec.size)
    reached = _across(mask, plane)
    positions = np.nonzero(reached)[0]
    labels = cut(mask.astype(np.float32), z_mm, plane, positions, rows_mm) > 0.5
    keep = labels.any(axis=(1, 2))
    return Examples(cut(view.images, z_mm, plane, positions, rows_mm)[keep], labels[keep].astype(np.float32),
                    _levels(positions, reached)[keep])


@dataclass
class PlaneQuery:
    """One structure's query cuts in one plane, each with the examples it is segmented from."""

    plane: str
    positions: np.ndarray  # (N,) rows (coronal) or columns (sagittal) of the view
    rows_mm: np.ndarray  # (size,) z of the cuts' rows
    images: np.ndarray  # (N, size, size)
    pool: np.ndarray  # (M, 2, size, size) example image and label pairs
    index: np.ndarray  # (N, S) rows of `pool` for each query


def plane_queries(view: ModelInput, region: np.ndarray, examples: dict[str, list[Examples]],
                  support_size: int) -> list[PlaneQuery]:
    """The cuts across `region` (a (Z, H, W) bool on the view, plus PLANE_MARGIN_MM either side), each with
    the `support_size` examples nearest its relative position; planes without examples are left out."""
    z_mm = slice_z_mm(view)
    rows_mm = window_rows_mm(_z_centre(region, z_mm), view.pixel_mm, view.spec.size)
    margin = int(np.ceil(PLANE_MARGIN_MM / view.pixel_mm))
    queries = []
    for plane in OTHER_PLANES:
        found = [e for e in examples.get(plane, []) if len(e.levels)]
        if not found:
            continue
        reached = _across(region, plane)
        first, last = np.nonzero(reached)[0][[0, -1]]
        positions = np.arange(max(0, first - margin), min(len(reached), last + margin + 1))
        images = np.concatenate([e.images for e in found])
        labels = np.concatenate([e.labels for e in found])
        levels = np.concatenate([e.levels for e in found])
        size = min(support_size, len(levels))
        index = np.stack([np.sort(np.argsort(np.abs(levels - level), kind="stable")[:size])
                          for level in _levels(positions, reached)])
        queries.append(PlaneQuery(plane, positions, rows_mm, cut(view.images, z_mm, plane, positions, rows_mm),
                                  np.stack([images, labels], axis=1), index))
    return queries


def plane_mean(axial: np.ndarray, computed: np.ndarray,
               others: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Mean of the axial probability and the other planes' (volume, slices reached) on the searched
    slices; the axial one alone where no other plane reached."""
    total = axial.astype(np.float32).copy()
    count = np.ones(len(axial), dtype=np.float32)
    for volume, reached in others:
        total[reached] += volume[reached]
        count[reached] += 1
    return np.where(computed[:, None, None], total / count[:, None, None], 0.0).astype(np.float32)
