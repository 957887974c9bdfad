"""RTSTRUCT in: a clinic's contoured ROIs as masks, so its planning exports can become support sets.

ROIs are found by name (case-insensitive, with the clinic's synonyms) and
rasterised as planning systems do (autocontour.dicom.contours.rasterise: voxel
centres inside, a slice's contours combined by XOR), in physical
coordinates onto whatever grid the CT has (a DICOM series or a NIfTI file).

A support set built from another scan's contours would teach the wrong
anatomy without a sign, so the contours must be the CT's: on a DICOM series
the ROI's Frame of Reference must be the series' and the images its contours
reference must be the series' own. A contour must lie on a slice (within a
quarter of the slice spacing): one half-way between two slices belongs to
neither, and rounding it onto one would move it silently. ContourData that
is not finite numbers in threes is refused.

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
from autocontour.dicom.series import DicomSeries
from autocontour.errors import InputImageError

MAX_OFF_SLICE = 0.25  # how far (in slice spacings) a contour may lie from the slice it is drawn on

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
                          + _listing(names))


def _listing(names: dict[int, str]) -> str:
    """The ROIs of a refusal: their names, and by number those whose name is blank (not "no ROI")."""
    if not names:
        return "no ROI"
    return ", ".join(sorted(name.strip() or f"ROI {number} (its name is blank)" for number, name in names.items()))


def roi_contours(rtstruct: pydicom.Dataset, roi_number: int) -> list[pydicom.Dataset]:
    """The ROI's contours (items of its ROIContourSequence entry)."""
    contours = next((c for c in getattr(rtstruct, "ROIContourSequence", [])
                     if int(c.ReferencedROINumber) == roi_number), None)
    if contours is None:
        raise InputImageError(f"ROI {roi_number} has no contour data in the RTSTRUCT")
    return list(getattr(contours, "ContourSequence", []))


def check_references(rtstruct: pydicom.Dataset, roi_number: int, series: DicomSeries) -> None:
    """Refuse an ROI drawn on another scan: another Frame of Reference, or contours on images not in the series."""
    name = roi_names(rtstruct)[roi_number]
    roi = next(r for r in rtstruct.StructureSetROISequence if int(r.ROINumber) == roi_number)
    frame = str(getattr(roi, "ReferencedFrameOfReferenceUID", ""))
    if frame and frame != series.frame_of_reference_uid:
        raise InputImageError(f"ROI {name!r} lies on another Frame of Reference than the CT series: its contours "
                              "were drawn on another scan")
    own = {str(ds.SOPInstanceUID) for ds in series.datasets}
    foreign = {str(image.ReferencedSOPInstanceUID) for contour in roi_contours(rtstruct, roi_number)
               for image in getattr(contour, "ContourImageSequence", [])} - own
    if foreign:
        raise InputImageError(f"ROI {name!r} references {len(foreign)} image(s) that are not in the CT series: its "
                              "contours were drawn on another series")


def contour_points(contour: pydicom.Dataset, roi_number: int) -> np.ndarray:
    """A contour's points (k x 3, mm), refused unless they are finite numbers in threes."""
    try:
        points = np.asarray([float(v) for v in contour.ContourData], dtype=float)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputImageError(f"ROI {roi_number}: a contour's ContourData is not a list of numbers") from exc
    if points.size % 3 or not np.isfinite(points).all():
        raise InputImageError(f"ROI {roi_number}: a contour's ContourData holds "
                              + ("a value that is not a finite number (NaN or infinite)"
                                 if not np.isfinite(points).all() else f"{points.size} values, not (x, y, z) triples"))
    return points.reshape(-1, 3)


def rasterise(rtstruct: pydicom.Dataset, roi_number: int, image: sitk.Image) -> np.ndarray:
    """The ROI as a (z, y, x) bool array on `image`'s voxel grid (index order, as SimpleITK arrays)."""
    size_x, size_y, size_z = image.GetSize()
    mask = np.zeros((size_z, size_y, size_x), dtype=bool)
    by_slice: dict[int, list[np.ndarray]] = {}
    for contour in roi_contours(rtstruct, roi_number):
        points = contour_points(contour, roi_number)
        if len(points) < 3 or getattr(contour, "ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
            continue  # a point or a line encloses no voxel
        index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
        level = float(np.median(index[:, 2]))
        z = int(np.floor(level + 0.5))
        if 0 <= z < size_z and np.ptp(index[:, 2]) <= 0.5:  # on one axial slice of the grid
            if abs(level - z) > MAX_OFF_SLICE:
                raise InputImageError(
                    f"ROI {roi_number}: a contour lies {abs(level - z) * image.GetSpacing()[2]:.2f} mm from the "
                    f"nearest CT slice (more than {MAX_OFF_SLICE:g} of the slice spacing): it is not on this CT's "
                    "slices, and which slice it belongs to would be a guess")
            by_slice.setdefault(z, []).append(index[:, :2])
    for z, polygons in by_slice.items():
        mask[z] = rasterise_slice(polygons, (size_y, size_x))
    return mask


def rtstruct_mask(path: Path, image: sitk.Image, wanted: list[str],
                  series: DicomSeries | None = None) -> tuple[sitk.Image, str]:
    """The named ROI of an RTSTRUCT file as a uint8 mask image on the CT's grid, and its ROI name; with the CT's
    `series` (a DICOM CT), checked to be drawn on it."""
    ds = read_rtstruct_file(path)
    number = find_roi(ds, wanted)
    if series is not None:
        check_references(ds, number, series)
    mask = sitk.GetImageFromArray(rasterise(ds, number, image).astype(np.uint8))
    mask.CopyInformation(image)
    return mask, roi_names(ds)[number]
