"""Domain randomisation: one labelled CT becomes many plausible patients and scanners.

In the spirit of SynthSeg (Billot et al., Medical Image Analysis 2023), which
trains on images synthesised from label maps and then segments real scans of
any contrast and resolution: the network should never be able to rely on one
patient's shape, one scanner's noise or one contrast phase. Each draw (one
seed) makes a virtual patient:

- anatomy: body-habitus scaling and a smooth 3D deformation
  (`autocontour.training.virtual.warp`, the benchmark's generator with wider ranges);
- acquisition: pixel size and slice thickness from 0.6-5 mm, with the
  partial-volume blur of that resolution;
- intensities: a scanner gain and offset, a per-label offset (organs differ
  between patients), contrast phases (enhanced vessels, kidneys, a bladder
  filling with contrast);
- artefacts: noise, a smooth bias field, metal streaks, the reconstruction
  circle, an axial field of view cut to the pelvis, the abdomen or a random
  range, and a lateral truncation.

The labels travel with the anatomy; the HU tasks (`autocontour.training.hu_tasks`)
are computed from the clean intensities before the artefacts. Seeds name the
draws: training uses 1-7999, validation 8000-8999, and `bench/cross_patient.py`'s
virtual patients (9101-9103) are never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel
from scipy import ndimage

from autocontour.io import CANONICAL_ORIENTATION
from autocontour.training.hu_tasks import TASK_BITS, TASKS, hu_task_bits
from autocontour.training.virtual import (
    AIR_HU,
    ENHANCEMENT_HU,
    RECONSTRUCTION_CIRCLE_HU,
    enhance,
    fov_range,
    outside_circle,
    to_images,
    warp,
)

MIN_GRID_PIXEL_MM = 1.0  # finer pixels are drawn as blur and noise only: the model sees ~2.7 mm pixels
MIN_GRID_SLICE_MM = 2.5  # thinner reconstructions keep every k-th slice: each axial slice is segmented alone
FWHM_PER_SIGMA = 2.355
METAL_HU = 3000.0


class DomainRandomisation(BaseModel):
    """The ranges a virtual patient is drawn from; the defaults are what training uses."""

    pixel_mm: tuple[float, float] = (0.6, 5.0)
    slice_mm: tuple[float, float] = (0.6, 5.0)
    deformation_mm: tuple[float, float] = (2.0, 10.0)
    habitus: tuple[float, float] = (0.85, 1.2)
    height: tuple[float, float] = (0.92, 1.08)
    scanner_gain: float = 0.05
    scanner_offset_hu: float = 20.0
    label_shift_hu: float = 15.0
    contrast_probability: float = 0.6
    phase_strength: tuple[float, float] = (0.4, 1.5)
    bladder_contrast_probability: float = 0.25
    bladder_contrast_hu: tuple[float, float] = (100.0, 800.0)
    noise_hu: tuple[float, float] = (0.0, 40.0)
    bias_hu: float = 30.0
    metal_probability: float = 0.15
    circle_probability: float = 0.5
    fov_probabilities: dict[str, float] = {"full": 0.5, "pelvis": 0.2, "abdomen": 0.2, "random": 0.1}
    lateral_truncation_probability: float = 0.15


@dataclass
class RandomPatient:
    """A randomised scan: CT (int16 HU, LPS), labels and HU-task bits on the same grid, and its draw."""

    ct: sitk.Image
    labels: sitk.Image
    hu_bits: sitk.Image
    parameters: dict


def _partial_volume(ct: sitk.Image, target_mm) -> sitk.Image:
    """Blur each axis from its spacing to the target resolution (Gaussian of the FWHM difference)."""
    for axis, (have, want) in enumerate(zip(ct.GetSpacing(), target_mm, strict=True)):
        sigma = np.sqrt(max(0.0, want ** 2 - have ** 2)) / FWHM_PER_SIGMA
        if sigma > 0.05:
            ct = sitk.RecursiveGaussian(ct, sigma=float(sigma), direction=axis)
    return ct


def _bias_field(shape, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.normal(0.0, amplitude, (3, 4, 4))
    return ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=3)[
        :shape[0], :shape[1], :shape[2]]


def _metal(hu: np.ndarray, bone: np.ndarray, spacing_zyx, rng: np.random.Generator) -> dict:
    """A metal implant in bone with streaks radiating from it over a few centimetres of slices."""
    points = np.argwhere(bone)
    if points.size == 0:
        return {}
    z, y, x = points[rng.integers(len(points))]
    half = max(1, int(round(rng.uniform(10, 30) / spacing_zyx[0])))
    radius_mm = rng.uniform(3, 8)
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    dy, dx = (yy - y) * spacing_zyx[1], (xx - x) * spacing_zyx[2]
    distance = np.hypot(dx, dy)
    streaks = np.zeros((ny, nx))
    for angle in rng.uniform(0, np.pi, int(rng.integers(4, 10))):
        across = np.abs(-np.sin(angle) * dx + np.cos(angle) * dy)
        streaks += rng.choice([-1, 1]) * rng.uniform(150, 500) * np.exp(-(across / 2.0) ** 2)
    streaks *= np.exp(-distance / 120.0)
    rows = slice(max(0, z - half), min(hu.shape[0], z + half + 1))
    hu[rows] += streaks
    hu[rows][:, distance <= radius_mm] = METAL_HU
    return {"metal_at_voxel": [int(z), int(y), int(x)], "metal_slices": int(rows.stop - rows.start)}


def _fov_rows(label_map: np.ndarray, names: dict[str, int], z_mm: np.ndarray, mode: str,
              rng: np.random.Generator) -> tuple[int, int]:
    if mode == "random":
        n = len(z_mm)
        length = int(rng.uniform(0.4, 0.9) * n)
        first = int(rng.integers(0, n - length + 1))
        return first, first + length
    lo, hi = fov_range(label_map, names, z_mm, mode)
    rows = np.nonzero((z_mm >= lo) & (z_mm <= hi))[0]
    return int(rows.min()), int(rows.max()) + 1


def random_patient(ct: sitk.Image, labels: sitk.Image, names: dict[str, int], seed: int,
                   randomisation: DomainRandomisation | None = None, hu_tasks=TASKS) -> RandomPatient:
    """One virtual patient from a labelled CT, reproducibly from `seed` (see the module docstring).

    `hu_tasks`: the HU tasks to compute (`autocontour.training.hu_tasks.hu_task_masks` says which to leave out for a
    scan whose enhanced organs must not be learnt); "enhanced_vessels" only where contrast was drawn."""
    r = randomisation or DomainRandomisation()
    rng = np.random.default_rng(seed)
    pixel, thickness = float(rng.uniform(*r.pixel_mm)), float(rng.uniform(*r.slice_mm))
    grid_slice = thickness * int(np.ceil(MIN_GRID_SLICE_MM / thickness))
    spacing = (max(pixel, MIN_GRID_PIXEL_MM), max(pixel, MIN_GRID_PIXEL_MM), grid_slice)
    ct = _partial_volume(sitk.Cast(sitk.DICOMOrient(ct, CANONICAL_ORIENTATION), sitk.sitkFloat32),
                         (pixel, pixel, thickness))
    warped = warp(ct, labels, rng, spacing, float(rng.uniform(*r.deformation_mm)), r.habitus, r.height)
    label_map, spacing_zyx = warped.labels, spacing[::-1]

    gain, offset = 1 + rng.normal(0, r.scanner_gain), rng.normal(0, r.scanner_offset_hu)
    shifts = rng.normal(0, r.label_shift_hu, int(label_map.max()) + 1)
    shifts[0] = 0.0
    hu = warped.hu * gain + offset + shifts[label_map]
    bits, enhancement = _contrast_and_tasks(hu, label_map, names, spacing_zyx, hu_tasks, r, rng)
    parameters: dict = {"seed": seed, "pixel_mm": round(pixel, 2), "slice_mm": round(thickness, 2),
                        "grid_mm": [round(s, 2) for s in spacing], "habitus_scale": np.round(warped.scale, 3).tolist(),
                        "gain": round(float(gain), 3), "offset_hu": round(float(offset), 1),
                        "enhancement_hu": enhancement}
    _artefacts(hu, label_map, bits, spacing_zyx, hu_tasks, r, rng, parameters)

    modes = list(r.fov_probabilities)
    weights = np.array([r.fov_probabilities[m] for m in modes])
    mode = str(rng.choice(modes, p=weights / weights.sum()))
    first, last = _fov_rows(label_map, names, warped.z_mm, mode, rng)
    parameters |= {"fov": mode, "slices": last - first}
    out_ct, out_labels = to_images(hu, label_map, warped.grid, first, last)
    out_bits = sitk.GetImageFromArray(bits[first:last])
    out_bits.CopyInformation(out_ct)
    return RandomPatient(out_ct, out_labels, out_bits, parameters)


def _contrast_and_tasks(hu: np.ndarray, label_map: np.ndarray, names: dict[str, int], spacing_zyx: tuple,
                        hu_tasks, r: DomainRandomisation, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Contrast in the vessels and organs (perhaps), the HU tasks, then contrast in the bladder (perhaps), in
    place; returns the HU task bits and the enhancement drawn."""
    enhancement: dict = {}
    contrast = bool(rng.random() < r.contrast_probability)
    if contrast:
        strength = float(rng.uniform(*r.phase_strength))
        enhancement = enhance(hu, label_map, names, rng,
                              {k: (lo * strength, hi * strength) for k, (lo, hi) in ENHANCEMENT_HU.items()})
    # the HU tasks before the bladder's contrast (its 800 HU would pass for bone) and before the artefacts
    bits = hu_task_bits(hu, spacing_zyx, [t for t in hu_tasks if contrast or t != "enhanced_vessels"])
    bladder = names.get("urinary_bladder")
    if bladder is not None and rng.random() < r.bladder_contrast_probability:
        enhancement["urinary_bladder"] = round(float(rng.uniform(*r.bladder_contrast_hu)), 1)
        hu[label_map == bladder] += enhancement["urinary_bladder"]
    return bits, enhancement


def _artefacts(hu: np.ndarray, label_map: np.ndarray, bits: np.ndarray, spacing_zyx: tuple, hu_tasks,
               r: DomainRandomisation, rng: np.random.Generator, parameters: dict) -> None:
    """Noise and bias field, then perhaps metal, a reconstruction circle and a lateral truncation, in place;
    what was drawn goes into `parameters`."""
    hu += rng.normal(0, rng.uniform(*r.noise_hu), hu.shape) + _bias_field(hu.shape, r.bias_hu, rng)
    if rng.random() < r.metal_probability:
        host = TASK_BITS["bone"] if "bone" in hu_tasks else TASK_BITS["body"]
        parameters |= _metal(hu, (bits & host) > 0, spacing_zyx, rng)
    outside = np.zeros(hu.shape[1:], dtype=bool)
    if rng.random() < r.circle_probability:
        outside |= outside_circle(hu.shape)
        parameters["circle"] = True
    if rng.random() < r.lateral_truncation_probability:
        columns = np.nonzero(bits.any(axis=(0, 1)))[0]
        cut = int(rng.uniform(0.05, 0.2) * (columns.max() - columns.min() + 1)) if columns.size else 0
        if rng.random() < 0.5:
            outside[:, :columns.min() + cut] = True
        else:
            outside[:, columns.max() + 1 - cut:] = True
        parameters["lateral_truncation_columns"] = cut
    hu[:, outside] = RECONSTRUCTION_CIRCLE_HU if parameters.get("circle") else AIR_HU
    label_map[:, outside] = 0
    bits[:, outside] = 0
