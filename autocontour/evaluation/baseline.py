"""A non-learned baseline: copy the most similar support slice's label, after registering it.

This is single-atlas segmentation per slice: for each query slice, the support
slice with the highest normalised cross-correlation is registered to it with
SimpleITK (2D affine, Mattes mutual information, multi-resolution) and its
label is warped across. A learned in-context model should beat it; the model
card reports both on the same slices.

`AtlasEngine` answers the network runner's `predict` with it, so the baseline
runs through `Segmenter.segment` like the network (bench/model_card.py): the same
search, the same supports per query (leave-slice-out included), the same
threshold and postprocessing; only the per-slice predictor differs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-8))


def register_label(fixed: np.ndarray, moving: np.ndarray, moving_label: np.ndarray) -> np.ndarray:
    """Affine-register `moving` to `fixed` (2D arrays in [0, 1]) and warp the label."""
    f = sitk.GetImageFromArray(fixed.astype(np.float32))
    m = sitk.GetImageFromArray(moving.astype(np.float32))
    initial = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMattesMutualInformation(32)
    registration.SetMetricSamplingStrategy(registration.RANDOM)
    registration.SetMetricSamplingPercentage(0.3, seed=1)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 100)
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([4, 2, 1])
    registration.SetSmoothingSigmasPerLevel([2, 1, 0])
    registration.SetInitialTransform(initial, inPlace=False)
    try:
        transform = registration.Execute(f, m)
    except RuntimeError:  # registration can fail on near-empty slices: fall back to identity
        transform = sitk.Transform(2, sitk.sitkIdentity)
    label = sitk.GetImageFromArray(moving_label.astype(np.float32))
    warped = sitk.Resample(label, f, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(warped)


class AtlasEngine:
    """Stands in for `autocontour.engine.Engine` in a `Segmenter`: registration instead of the network."""

    device = torch.device("cpu")
    precision = "n/a (registration, no network)"

    def predict(self, queries: np.ndarray, pool: np.ndarray, index: np.ndarray,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(B, H, W) label fractions: query b copies the best match among its supports `pool[index[b]]`
        ((N, 2, H, W) [image, label] pairs), as `Engine.predict` is called."""
        out = np.zeros(queries.shape, dtype=np.float32)
        for b, query in enumerate(queries):
            best = max(index[b], key=lambda j: _ncc(query, pool[j, 0]))
            if pool[best, 1].any():
                out[b] = register_label(query, pool[best, 0], pool[best, 1])
            if progress:
                progress(1)
        return out
