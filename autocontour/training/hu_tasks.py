"""Tasks that exist in every CT: tissues computed from Hounsfield units and morphology.

A labelled structure gives a cross-patient task only where two patients label
it; body outline, bone, lungs, gas in bowel, fat, soft tissue and
contrast-filled vessels exist in any scan, labelled or not. Each is a fixed
rule on the HU volume, so support and query of an episode follow the same
rule in different patients. They are not anatomy a clinic would contour; they
teach the network to follow the support's rule on a new patient.

The masks travel as bits of one uint8 per voxel (`TASK_BITS`), because they
overlap each other and every label (the body contains everything).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TASKS = ("body", "bone", "lungs", "bowel_gas", "fat", "soft_tissue", "enhanced_vessels")
TASK_BITS = {name: 1 << i for i, name in enumerate(TASKS)}
PREFIX = "hu:"  # task names in the training data: "hu:bone", never confused with a label name
LUNG_MIN_ML = 150.0  # air regions inside the body this large are lungs (and airways); smaller ones, gas
GAS_MIN_ML = 0.2


def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(s) for s in mask])


def _largest(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return labelled == 1 + int(np.argmax(sizes))


def hu_task_masks(hu: np.ndarray, spacing_zyx, tasks=TASKS) -> dict[str, np.ndarray]:
    """The named tasks' masks on a (z, y, x) HU volume.

    "bone" is dense tissue (> 200 HU) in regions that reach 500 HU: in a contrast scan that includes enhanced
    blood, so leave "bone" and "enhanced_vessels" out of `tasks` for scans whose enhanced organs must not be
    learnt (the chest-abdomen example's held-back aorta and kidneys)."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    smooth = ndimage.median_filter(hu, size=(1, 3, 3))
    body = _fill_per_slice(_largest(ndimage.binary_opening(smooth > -500, iterations=2)))
    dense = (smooth > 200) & body
    labelled, count = ndimage.label(dense)
    if count:
        peak = ndimage.maximum(smooth, labelled, index=np.arange(1, count + 1))
        size = np.bincount(labelled.ravel(), minlength=count + 1)[1:] * voxel_ml
        keep = np.concatenate([[False], (peak > 500) & (size >= 1.0)])
        bone = _fill_per_slice(keep[labelled])
    else:
        bone = dense
    air, count = ndimage.label((smooth < -500) & body)
    size = np.bincount(air.ravel(), minlength=count + 1) * voxel_ml
    size[0] = 0
    lungs = (size >= LUNG_MIN_ML)[air]
    gas = ((size >= GAS_MIN_ML) & (size < LUNG_MIN_ML))[air]
    masks = {
        "body": body,
        "bone": bone,
        "lungs": lungs,
        "bowel_gas": gas & ~ndimage.binary_dilation(lungs, iterations=3),
        "fat": (smooth >= -190) & (smooth <= -30) & body,
        "soft_tissue": (smooth >= 20) & (smooth <= 100) & body & ~bone,
    }
    if "enhanced_vessels" in tasks:
        vessels = (smooth >= 150) & (smooth <= 600) & body & ~ndimage.binary_dilation(bone, iterations=2)
        masks["enhanced_vessels"] = ndimage.binary_opening(vessels)
    return {name: mask for name, mask in masks.items() if name in tasks}


def hu_task_bits(hu: np.ndarray, spacing_zyx, tasks=TASKS) -> np.ndarray:
    """The tasks of `hu_task_masks` packed into one uint8 per voxel (`TASK_BITS`)."""
    bits = np.zeros(hu.shape, dtype=np.uint8)
    for name, mask in hu_task_masks(hu, spacing_zyx, tasks).items():
        bits[mask] |= TASK_BITS[name]
    return bits
