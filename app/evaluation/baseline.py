"""A non-learned baseline: copy the most similar support slice's label, after registering it.

This is single-atlas segmentation per slice: for each query slice, the support
slice with the highest normalised cross-correlation is registered to it with
SimpleITK (2D affine, Mattes mutual information, multi-resolution) and its
label is warped across. A learned in-context model should beat it; the model
card reports both on the same slices.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from app.support.store import SupportSet


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


def atlas_predict(queries: np.ndarray, support: SupportSet, allowed: list[np.ndarray]) -> np.ndarray:
    """(Z, H, W) label fractions for the queries; `allowed[i]` masks the supports query i may use."""
    out = np.zeros(queries.shape, dtype=np.float32)
    for i, query in enumerate(queries):
        candidates = np.nonzero(allowed[i])[0]
        best = max(candidates, key=lambda j: _ncc(query, support.images[j]))
        if support.labels[best].any():
            out[i] = register_label(query, support.images[best], support.labels[best])
    return out
