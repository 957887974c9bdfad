"""RTSTRUCT in: a clinic's contoured ROIs as masks, so its planning exports can become support sets.

ROIs are found by name (case-insensitive, with the clinic's synonyms) and
rasterised as planning systems do (autocontour.dicom.contours.rasterise: voxel
centres inside, a slice's contours combined by XOR), in physical
coordinates onto whatever grid the CT has (a DICOM series or a NIfTI file).

A support case teaches the network what the clinic draws, so only contours a
clinician stands behind may become one: `approval_refusal` says why an
RTSTRUCT must not (its RT Approval status is UNAPPROVED or REJECTED, or it is
an autocontour draft). An RTSTRUCT without the optional RT Approval module is
taken as the clinic's own export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from autocontour.dicom import DRAFT_DESCRIPTION
from autocontour.dicom.contours import rasterise as rasterise_slice
from autocontour.errors import InputImageError

ALLOW_UNAPPROVED_FLAG = "--allow-unapproved"


def approval_refusal(rtstruct: pydicom.Dataset) -> str | None:
    """Why this structure set must not become a support case, or None when it may."""
    status = str(getattr(rtstruct, "ApprovalStatus", "")).strip().upper()
    if status in ("UNAPPROVED", "REJECTED"):
        return f"its RT Approval status is {status}: no clinician approved these contours"
    ours = str(getattr(rtstruct, "Manufacturer", "")) == "autocontour"
    if ours and status != "APPROVED" and DRAFT_DESCRIPTION in (str(getattr(rtstruct, "StructureSetName", "")),
                                                               str(getattr(rtstruct, "SeriesDescription", ""))):
        return "it is an autocontour draft that no clinician approved"
    return None


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
    by_slice: dict[int, list[np.ndarray]] = {}
    for contour in getattr(contours, "ContourSequence", []):
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        if len(points) < 3 or getattr(contour, "ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
            continue  # a point or a line encloses no voxel
        index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
        z = int(round(float(np.median(index[:, 2]))))
        if 0 <= z < size_z and np.ptp(index[:, 2]) <= 0.5:  # on one axial slice of the grid
            by_slice.setdefault(z, []).append(index[:, :2])
    for z, polygons in by_slice.items():
        mask[z] = rasterise_slice(polygons, (size_y, size_x))
    return mask


def rtstruct_mask(path: Path, image: sitk.Image, wanted: list[str]) -> tuple[sitk.Image, str]:
    """The named ROI of an RTSTRUCT file as a uint8 mask image on the CT's grid, and its ROI name."""
    ds = read_rtstruct_file(path)
    number = find_roi(ds, wanted)
    mask = sitk.GetImageFromArray(rasterise(ds, number, image).astype(np.uint8))
    mask.CopyInformation(image)
    return mask, roi_names(ds)[number]
