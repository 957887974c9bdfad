"""bench/cross_patient.py's field-of-view ceiling: what a perfect copy of cut-off examples reaches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from cross_patient import Case, Scan, fov_ceiling  # noqa: E402

NAMES = {"vertebrae_L1": 1, "vertebrae_L2": 2, "vertebrae_L3": 3, "muscle": 4}


def _scan(z_slices: int, origin_z: float, spacing_z: float, vertebrae_mm: dict[str, tuple[float, float]],
          muscle_mm: tuple[float, float]) -> Scan:
    z_mm = origin_z + spacing_z * np.arange(z_slices)
    labels = np.zeros((z_slices, 8, 8), np.uint8)
    for name, (low, high) in vertebrae_mm.items():
        labels[(z_mm >= low) & (z_mm <= high), 2:4, 2:4] = NAMES[name]
    labels[(z_mm >= muscle_mm[0]) & (z_mm <= muscle_mm[1]), 5:7, 5:7] = NAMES["muscle"]
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.0, 1.0, spacing_z))
    image.SetOrigin((0.0, 0.0, origin_z))
    return Scan("synthetic", image, image, NAMES)


def test_the_ceiling_keeps_the_reference_on_the_levels_the_source_shows():
    # the source shows L2 and L3 and stops inside L1; the query, 100 mm further up, shows all three
    # and a muscle running from 20 mm below L3 to 20 mm above L1
    spine = {"vertebrae_L3": (10.0, 38.0), "vertebrae_L2": (42.0, 70.0), "vertebrae_L1": (74.0, 102.0)}
    source = _scan(45, 0.0, 2.0, spine, (0.0, 88.0))  # z 0..88 mm
    shifted = {n: (low + 100.0, high + 100.0) for n, (low, high) in spine.items()}
    query = _scan(80, 80.0, 2.0, shifted, (90.0, 222.0))  # muscle 90..222 mm, 67 slices
    ceiling = fov_ceiling(Case("synthetic", source, query, {"muscle": ("muscle",)}))
    inside = np.count_nonzero((np.arange(90.0, 223.0, 2.0) >= 100.0) & (np.arange(90.0, 223.0, 2.0) <= 188.0))
    share = inside / 67
    assert abs(ceiling["muscle"] - 2 * share / (1 + share)) < 1e-9
    # a source that shows the query's whole structure has nothing to cap
    whole = _scan(120, 80.0, 2.0, shifted, (90.0, 222.0))
    assert fov_ceiling(Case("synthetic", whole, query, {"muscle": ("muscle",)}))["muscle"] == 1.0
