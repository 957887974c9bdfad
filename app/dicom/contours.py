"""RTSTRUCT in: a clinic's contours as masks, so its planning exports can become support sets.

Planning systems rasterise a closed planar contour by its pixel centres: a
voxel belongs to the ROI when its centre lies inside the polygon, and
contours on the same slice combine by the even-odd rule (a contour inside
another is a hole; separate islands add). We do the same, in physical
coordinates, onto whatever grid the CT has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as Polygon

from app.errors import InputImageError


def roi_names(rtstruct: pydicom.Dataset) -> dict[int, str]:
    """ROI number -> name."""
    return {int(r.ROINumber): str(r.ROIName) for r in getattr(rtstruct, "StructureSetROISequence", [])}


def read_rtstruct_file(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(str(path))
    except (pydicom.errors.InvalidDicomError, OSError) as exc:
        raise InputImageError(f"{Path(path).name}: not a readable DICOM file: {exc}") from exc
    if getattr(ds, "Modality", "") != "RTSTRUCT":
        raise InputImageError(f"{Path(path).name}: modality {getattr(ds, 'Modality', 'none')!r}, expected RTSTRUCT")
    return ds


def find_roi(rtstruct: pydicom.Dataset, wanted: list[str]) -> int:
    """The ROI number whose name matches one of `wanted` (case-insensitive, first synonym that exists)."""
    names = roi_names(rtstruct)
    by_name = {name.strip().lower(): number for number, name in names.items()}
    for name in wanted:
        if name.strip().lower() in by_name:
            return by_name[name.strip().lower()]
    raise InputImageError(f"no ROI named {' or '.join(repr(w) for w in wanted)} in the RTSTRUCT; it has: "
                          + (", ".join(sorted(names.values())) or "no ROI"))


def rasterise(rtstruct: pydicom.Dataset, roi_number: int, image: sitk.Image) -> np.ndarray:
    """The ROI as a (z, y, x) bool array on `image`'s voxel grid (index order, as SimpleITK arrays)."""
    size_x, size_y, size_z = image.GetSize()
    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    contours = next((c for c in getattr(rtstruct, "ROIContourSequence", [])
                     if int(c.ReferencedROINumber) == roi_number), None)
    if contours is None:
        raise InputImageError(f"ROI {roi_number} has no contour data in the RTSTRUCT")
    ys, xs = np.mgrid[0:size_y, 0:size_x]
    centres = np.column_stack([xs.ravel(), ys.ravel()]).astype(float)
    for contour in getattr(contours, "ContourSequence", []):
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        if len(points) < 3:
            continue  # a point or a line encloses no voxel
        index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
        z = int(round(float(np.median(index[:, 2]))))
        if not 0 <= z < size_z or np.ptp(index[:, 2]) > 0.5:
            continue  # off the grid, or not on one axial slice of it
        lo, hi = np.floor(index[:, :2].min(axis=0)).astype(int), np.ceil(index[:, :2].max(axis=0)).astype(int)
        box = ((centres[:, 0] >= lo[0]) & (centres[:, 0] <= hi[0]) & (centres[:, 1] >= lo[1]) &
               (centres[:, 1] <= hi[1]))
        inside = np.zeros(len(centres), dtype=bool)
        inside[box] = Polygon(index[:, :2]).contains_points(centres[box])
        mask[z] ^= inside.reshape(size_y, size_x)  # even-odd: holes and islands
    return mask


def rtstruct_mask(path: Path, image: sitk.Image, wanted: list[str]) -> tuple[sitk.Image, str]:
    """The named ROI of an RTSTRUCT file as a uint8 mask image on the CT's grid, and its ROI name."""
    ds = read_rtstruct_file(path)
    number = find_roi(ds, wanted)
    mask = sitk.GetImageFromArray(rasterise(ds, number, image).astype(np.uint8))
    mask.CopyInformation(image)
    return mask, roi_names(ds)[number]
