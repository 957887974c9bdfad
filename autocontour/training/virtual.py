"""Virtual patients: a labelled CT turned into another plausible patient, reproducibly from a seed.

One real labelled scan is not a benchmark; the ways real scans differ from it
can be simulated. A virtual patient differs from its source the way patients
and protocols do: a smooth deformation (organs shift and bend), body habitus
(wider, narrower, taller), resolution (0.7 x 0.7 x 2.5 mm, the usual
contrast-enhanced diagnostic protocol, against a 3 mm planning CT),
contrast phase (enhanced vessels and kidneys, per organ label), the
reconstruction circle (-2048 HU outside the scanner's field of view) and the
axial field of view (a pelvis-only or abdomen-only scan). The labels travel
with the same transform, so every virtual patient has exact ground truth.

Everything is drawn from `numpy.random.default_rng(seed)`: the same seed
gives the same patient, so a benchmark can name its cases by seed and
training (autocontour.training) can draw others from a disjoint seed range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from autocontour.io import CANONICAL_ORIENTATION

DIAGNOSTIC_SPACING_MM = (0.7, 0.7, 2.5)
RECONSTRUCTION_CIRCLE_HU = -2048
AIR_HU = -1000
DEFORMATION_CONTROL_SPACING_MM = 80.0  # organ-scale bends, not voxel noise
FIELD_SPACING_MM = 4.0  # the dense displacement field is sampled this coarsely, then interpolated
FOV_MARGIN_MM = 20.0

# contrast-phase enhancement in HU (low, high) by label-name fragment; arterial > portal-venous > organs
ENHANCEMENT_HU: dict[str, tuple[float, float]] = {
    "aorta": (150, 300), "artery": (150, 300),
    "vena_cava": (80, 180), "iliac_vena": (80, 180), "portal_vein": (80, 180),
    "kidney": (120, 200), "spleen": (60, 100), "liver": (40, 80), "pancreas": (30, 60),
}


@dataclass
class VirtualPatient:
    """A simulated scan: CT (int16 HU, LPS), its label map (same values as the source) and how it was drawn."""

    ct: sitk.Image
    labels: sitk.Image
    parameters: dict


def smooth_deformation(reference: sitk.Image, amplitude_mm: float, rng: np.random.Generator,
                       control_spacing_mm: float = DEFORMATION_CONTROL_SPACING_MM) -> sitk.BSplineTransform:
    """A random smooth displacement over `reference`'s extent: cubic B-spline, coefficients ~ N(0, amplitude)."""
    physical = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    mesh = [max(1, int(round(p / control_spacing_mm))) for p in physical]
    bspline = sitk.BSplineTransformInitializer(reference, mesh, order=3)
    bspline.SetParameters(rng.normal(0.0, amplitude_mm, len(bspline.GetParameters())).tolist())
    return bspline


def _body_centre(ct: sitk.Image) -> np.ndarray:
    zs, ys, xs = np.nonzero(sitk.GetArrayViewFromImage(ct) > -500)
    index = [float(xs.mean()), float(ys.mean()), float(zs.mean())]
    return np.array(ct.TransformContinuousIndexToPhysicalPoint(index))


def _output_grid(ct: sitk.Image, scale: np.ndarray, centre: np.ndarray, spacing_mm) -> sitk.Image:
    """The source's extent, scaled by the habitus about the body centre, on the new spacing (LPS)."""
    size = np.array(ct.GetSize())
    lo = np.array(ct.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    hi = np.array(ct.TransformContinuousIndexToPhysicalPoint((size - 0.5).tolist()))
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    lo, hi = centre + (lo - centre) * scale, centre + (hi - centre) * scale
    spacing = np.asarray(spacing_mm, dtype=float)
    new_size = np.maximum(1, np.floor((hi - lo) / spacing).astype(int))
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetOrigin((lo + spacing / 2).tolist())
    return grid


def _field_transform(grid: sitk.Image, transform: sitk.Transform) -> sitk.DisplacementFieldTransform:
    """`transform` sampled as a dense field every FIELD_SPACING_MM: resampling 30 M voxels through a
    B-spline directly costs minutes, through an interpolated field seconds."""
    physical = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    size = [int(np.ceil(p / FIELD_SPACING_MM)) + 3 for p in physical]
    origin = np.array(grid.GetOrigin()) - FIELD_SPACING_MM
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size, origin.tolist(),
                                              [FIELD_SPACING_MM] * 3, grid.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def fov_range(labels: np.ndarray, names: dict[str, int], z_mm: np.ndarray, fov: str) -> tuple[float, float]:
    """The z range (mm) of a pelvis-only or abdomen-only field of view, from the skeleton's labels.

    Pelvis: up to the top of the sacrum plus a margin (what a cervix planning CT covers). Abdomen: down to
    the top of the hip bones less a margin. Without those labels, the lower / upper 55 % of the scan.
    """
    def top_of(*label_names: str) -> float | None:
        values = [names[n] for n in label_names if n in names]
        if not values:
            return None
        rows = np.nonzero(np.isin(labels, values).any(axis=(1, 2)))[0]
        return float(z_mm[rows.max()]) if rows.size else None

    lo, hi = float(z_mm.min()), float(z_mm.max())
    if fov == "pelvis":
        top = top_of("sacrum")
        return lo, (top + FOV_MARGIN_MM) if top is not None else lo + 0.55 * (hi - lo)
    if fov == "abdomen":
        top = top_of("hip_left", "hip_right")
        return (top - FOV_MARGIN_MM) if top is not None else hi - 0.55 * (hi - lo), hi
    if fov == "full":
        return lo, hi
    raise ValueError(f"unknown field of view {fov!r}: full, pelvis or abdomen")


@dataclass
class Warped:
    """A labelled CT after a habitus scaling and a smooth bend, on a new grid (float HU, labels, z in mm)."""

    hu: np.ndarray
    labels: np.ndarray
    grid: sitk.Image
    scale: np.ndarray

    @property
    def z_mm(self) -> np.ndarray:
        return self.grid.GetOrigin()[2] + self.grid.GetSpacing()[2] * np.arange(self.hu.shape[0])


def warp(ct: sitk.Image, labels: sitk.Image, rng: np.random.Generator, spacing_mm, deformation_mm: float,
         habitus: tuple[float, float], height: tuple[float, float]) -> Warped:
    """Habitus scaling about the body centre (in-plane `habitus`, along z `height`) and a smooth deformation of
    `deformation_mm` per control point, resampled onto `spacing_mm`; labels travel with the same transform."""
    ct = sitk.Cast(sitk.DICOMOrient(ct, CANONICAL_ORIENTATION), sitk.sitkFloat32)
    labels = sitk.DICOMOrient(labels, CANONICAL_ORIENTATION)
    centre = _body_centre(ct)
    width = float(rng.uniform(*habitus))
    scale = np.array([width * rng.uniform(0.97, 1.03), width * rng.uniform(0.97, 1.03), rng.uniform(*height)])
    grid = _output_grid(ct, scale, centre, spacing_mm)

    # output point p -> source point: undo the habitus scaling about the centre, then bend
    habitus_transform = sitk.AffineTransform(3)
    habitus_transform.SetCenter(centre.tolist())
    habitus_transform.SetMatrix(np.diag(1.0 / scale).ravel().tolist())
    bend = smooth_deformation(ct, deformation_mm, rng)
    to_source = sitk.CompositeTransform(3)
    to_source.AddTransform(bend)
    to_source.AddTransform(habitus_transform)  # added last, applied first
    field = _field_transform(grid, to_source)

    hu = sitk.GetArrayFromImage(sitk.Resample(ct, grid, field, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32))
    label_map = sitk.GetArrayFromImage(sitk.Resample(labels, grid, field, sitk.sitkNearestNeighbor, 0,
                                                     labels.GetPixelID()))
    return Warped(hu, label_map, grid, scale)


def enhance(hu: np.ndarray, label_map: np.ndarray, names: dict[str, int], rng: np.random.Generator,
            ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
    """Contrast enhancement per label (in place): each label whose name contains a key of `ranges` gains a
    uniform draw from its range; returns the HU added per label."""
    enhancement = {}
    for name, value in sorted(names.items()):
        matching = [r for fragment, r in (ranges or ENHANCEMENT_HU).items() if fragment in name]
        if matching:
            enhancement[name] = round(float(rng.uniform(*matching[0])), 1)
            hu[label_map == value] += enhancement[name]
    return enhancement


def outside_circle(shape) -> np.ndarray:
    """The in-plane pixels (y, x) of a (z, y, x) volume outside its largest centred circle."""
    _, ny, nx = shape
    yy, xx = np.ogrid[:ny, :nx]
    return (xx - (nx - 1) / 2) ** 2 + (yy - (ny - 1) / 2) ** 2 > (min(nx, ny) / 2) ** 2


def reconstruction_circle(hu: np.ndarray) -> None:
    """Set everything outside the largest centred in-plane circle to the scanner's padding value (in place)."""
    hu[:, outside_circle(hu.shape)] = RECONSTRUCTION_CIRCLE_HU


def to_images(hu: np.ndarray, label_map: np.ndarray, grid: sitk.Image, first: int,
              last: int) -> tuple[sitk.Image, sitk.Image]:
    """Slices first..last-1 as an int16 CT and a label map on `grid`'s geometry."""
    out_ct = sitk.GetImageFromArray(np.clip(np.round(hu[first:last]), -32768, 32767).astype(np.int16))
    out_labels = sitk.GetImageFromArray(label_map[first:last])
    for image in (out_ct, out_labels):
        image.SetSpacing(grid.GetSpacing())
        image.SetDirection(grid.GetDirection())
        image.SetOrigin(grid.TransformIndexToPhysicalPoint([0, 0, first]))
    return out_ct, out_labels


def virtual_patient(ct: sitk.Image, labels: sitk.Image, names: dict[str, int], seed: int, fov: str = "full",
                    spacing_mm=DIAGNOSTIC_SPACING_MM, deformation_mm: float = 6.0,
                    habitus: tuple[float, float] = (0.9, 1.12), height: tuple[float, float] = (0.95, 1.05),
                    contrast: bool = True, circle: bool = True) -> VirtualPatient:
    """A virtual patient from a labelled CT (`names`: label name -> value); see the module docstring.

    The transform is drawn first (`warp`), then the intensities (enhancement per label when `contrast`, the
    reconstruction circle when `circle`), then the field of view.
    """
    rng = np.random.default_rng(seed)
    warped = warp(ct, labels, rng, spacing_mm, deformation_mm, habitus, height)
    hu, label_map = warped.hu, warped.labels
    enhancement = enhance(hu, label_map, names, rng) if contrast else {}
    if circle:
        reconstruction_circle(hu)
    z_mm = warped.z_mm
    lo, hi = fov_range(label_map, names, z_mm, fov)
    rows = np.nonzero((z_mm >= lo) & (z_mm <= hi))[0]
    first, last = int(rows.min()), int(rows.max()) + 1
    out_ct, out_labels = to_images(hu, label_map, warped.grid, first, last)
    parameters = {"seed": seed, "fov": fov, "spacing_mm": list(spacing_mm),
                  "habitus_scale": np.round(warped.scale, 3).tolist(), "deformation_mm": deformation_mm,
                  "enhancement_hu": enhancement, "circle": circle,
                  "z_range_mm": [round(float(z_mm[first]), 1), round(float(z_mm[last - 1]), 1)]}
    return VirtualPatient(out_ct, out_labels, parameters)
