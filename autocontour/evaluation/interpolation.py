"""What a planning system offers between drawn slices: the baselines in-context propagation must beat.

Two interpolations of a structure drawn on a few axial slices:

- shape-based (signed-distance) interpolation, the "interpolate" button of most
  planning systems: each drawn slice becomes a signed distance map (mm, negative
  inside), the maps of the two drawn slices around an undrawn one are blended
  linearly by axial position and the blend's zero level is the contour;
- ITK's morphological contour interpolation (Albu et al. 2008; the
  `itk-morphologicalcontourinterpolation` package), the algorithm behind 3D
  Slicer's "Fill between slices". It is an optional dependency (extra `bench`),
  imported only when called, so the product and the tests never need it.

Neither extrapolates: beyond the outermost drawn slices they return nothing,
which is what a planner gets from them.

Masks are canonical (z, y, x) arrays; `drawn` are the axial indices drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

EMPTY_DISTANCE_MM = 1e4  # a slice with nothing drawn: "far outside" everywhere


def signed_distance(slice_mask: np.ndarray, spacing_yx: Sequence[float]) -> np.ndarray:
    """Signed in-plane distance (mm) to a slice's contour: negative inside, positive outside.

    Inside pixels get minus their distance to the nearest outside pixel and
    outside pixels their distance to the nearest inside pixel, so `< 0` gives the
    slice back exactly.
    """
    inside = np.asarray(slice_mask, dtype=bool)
    if not inside.any():
        return np.full(inside.shape, EMPTY_DISTANCE_MM, dtype=np.float32)
    if inside.all():
        return np.full(inside.shape, -EMPTY_DISTANCE_MM, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~inside, sampling=spacing_yx)
    depth = ndimage.distance_transform_edt(inside, sampling=spacing_yx)
    return (np.asarray(outside) - np.asarray(depth)).astype(np.float32)


def interpolated_distance(mask: np.ndarray, drawn: Sequence[int], spacing_yx: Sequence[float]) -> np.ndarray:
    """(z, y, x) signed distance (mm) blended between consecutive drawn slices.

    Slices outside the drawn range get EMPTY_DISTANCE_MM (no extrapolation). On a
    drawn slice the value is that slice's own signed distance.
    """
    order = sorted({int(z) for z in drawn})
    out = np.full(mask.shape, EMPTY_DISTANCE_MM, dtype=np.float32)
    if not order:
        return out
    maps = {z: signed_distance(mask[z], spacing_yx) for z in order}
    for z in order:
        out[z] = maps[z]
    for low, high in zip(order[:-1], order[1:], strict=True):
        for z in range(low + 1, high):
            t = (z - low) / (high - low)
            out[z] = (1 - t) * maps[low] + t * maps[high]
    return out


def sdf_interpolate(mask: np.ndarray, drawn: Sequence[int], spacing_yx: Sequence[float]) -> np.ndarray:
    """Shape-based interpolation between the drawn slices of `mask` (bool, canonical z, y, x)."""
    return interpolated_distance(mask, drawn, spacing_yx) < 0


def mci_interpolate(mask: np.ndarray, drawn: Sequence[int], spacing_zyx: Sequence[float]) -> np.ndarray:
    """ITK morphological contour interpolation (3D Slicer's "Fill between slices") along z.

    Only the drawn slices of `mask` are shown to ITK. Needs the `bench` extra
    (itk-morphologicalcontourinterpolation); imported here so nothing else does.
    """
    import itk  # optional, heavy: only the benchmark calls this

    index = sorted({int(z) for z in drawn})
    out = np.zeros(mask.shape, dtype=bool)
    out[index] = np.asarray(mask[index], dtype=bool)
    if len(index) < 2 or not out.any():
        return out
    # ITK works on the drawn slices' box (2 voxels of margin): the same result, much faster
    _, ys, xs = np.nonzero(out)
    y0, x0 = max(0, ys.min() - 2), max(0, xs.min() - 2)
    box = np.s_[index[0]:index[-1] + 1, y0:ys.max() + 3, x0:xs.max() + 3]
    image = itk.image_from_array(np.ascontiguousarray(out[box], dtype=np.uint8))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    filled = itk.morphological_contour_interpolator(image, axis=2)  # ITK's axis 2 is numpy's z
    out[box] = itk.array_from_image(filled).astype(bool)
    out[index] = np.asarray(mask[index], dtype=bool)  # the drawn slices stay exactly as drawn
    return out
