"""DICOM out: an RTSTRUCT a planning system imports, and a DICOM-SEG, both marked as drafts.

RTSTRUCT (written with pydicom, module by module of the RT Structure Set IOD):
the patient, study, frame-of-reference and institution attributes are copied
from the input CT with its character set (and nothing is invented for them);
the series, structure set and instance carry their own date and time. It
references the input series (study, frame of reference, every SOP instance),
has one ROI per structure with its name (display or TG-263), colour and RT ROI
Interpreted Type, and contours on the input's own slices along the voxel
boundaries (`autocontour.dicom.contours`), so a planning system rasterises exactly our
masks. Decimal strings have at most 16 characters (longer ones are a known
cause of rejected RTSTRUCTs), approval status is UNAPPROVED, and the series
description says "autocontour draft".

DICOM-SEG (highdicom): one binary segment per structure, each carrying the
algorithm identification (name, version, model SHA-256, support-set ids).

Both writers take the structure definitions as a parameter: objects with
`display_name`, `colour`, `interpreted_type` and `tg263_name` (None: the
display name is used).
"""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from autocontour import __version__
from autocontour.dicom import ROI_NAME_STYLES
from autocontour.dicom.contours import rasterise, slice_polygons
from autocontour.dicom.series import DicomSeries
from autocontour.errors import OptionError

DRAFT_DESCRIPTION = "autocontour draft - not approved"
APPROVED_DESCRIPTION = "autocontour - approved"
RTSTRUCT_FILE = "rtstruct.dcm"
SEG_FILE = "seg.dcm"
# Contour Data is one DS value list; in explicit VR its length field has 16 bits. 3 values of at most 16
# characters and a separator each per point.
MAX_CONTOUR_POINTS = 0xFFFE // (3 * 17)
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # the SOP class RTSTRUCTs cite for their study (retired)

# Copied from the input CT when present; the type-2 ones (which must be there, empty if unknown) are listed
# in COPIED_TYPE2. Patient, General Study, Patient Study, Frame of Reference and the General Equipment's
# institution attributes.
COPIED = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight",
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
)
COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator")

# Segmented property (category, type), SNOMED CT: specific codes for the shipped structures,
# otherwise a generic one by RT ROI Interpreted Type.
_CTV = (codes.SCT.SpatialAndRelationalConcept, codes.SCT.ClinicalTargetVolume)
PROPERTY_CODES = {
    "bladder": (codes.SCT.Organ, hd.sr.CodedConcept("89837001", "SCT", "Urinary bladder")),
    "anorectum": (codes.SCT.Organ, codes.SCT.Rectum),
    "ctvn": _CTV,
    "ctvp": _CTV,
    "parametrium": _CTV,
}
PROPERTY_CODES_BY_TYPE = {
    "CTV": _CTV,
    "GTV": (codes.SCT.SpatialAndRelationalConcept, codes.SCT.GrossTumorVolume),
    "PTV": (codes.SCT.SpatialAndRelationalConcept, codes.SCT.PlanningTargetVolume),
    "ORGAN": (codes.SCT.AnatomicalStructure, codes.SCT.Organ),
}
GENERIC_PROPERTY = (codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure)


def _ds16(value: float) -> str:
    return format_number_as_ds(float(value))  # the shortest exact-enough form, at most 16 characters


def roi_name(definition: Any, style: str) -> str:
    """The ROI name a planning system shows: the display name, or the TG-263 name where there is one."""
    if style not in ROI_NAME_STYLES:
        raise OptionError(f"ROI names must be one of {', '.join(ROI_NAME_STYLES)}, got {style!r}")
    return (definition.tg263_name if style == "tg263" else None) or definition.display_name


def _slice_axes(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Origin and the patient-space steps of one column and one row of a slice."""
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (np.array([float(v) for v in ds.ImagePositionPatient]), orientation[:3] * column_spacing,
            orientation[3:] * row_spacing)


def _copy_from_input(ds: pydicom.Dataset, source: pydicom.Dataset) -> None:
    for keyword in COPIED:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])
        elif keyword in COPIED_TYPE2:
            setattr(ds, keyword, "")
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = copy.deepcopy(source.SpecificCharacterSet)


def _image_reference(ds: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _contours(series: DicomSeries, mask: np.ndarray) -> list[pydicom.Dataset]:
    contours: list[pydicom.Dataset] = []
    for index in np.nonzero(mask.any(axis=(1, 2)))[0]:
        image = series.datasets[index]
        origin, column_step, row_step = _slice_axes(image)
        for polygon in slice_polygons(mask[index], MAX_CONTOUR_POINTS):
            points = origin + polygon[:, :1] * column_step + polygon[:, 1:] * row_step
            contour = pydicom.Dataset()
            contour.ContourImageSequence = [_image_reference(image)]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = [_ds16(v) for v in points.ravel()]
            contours.append(contour)
    return contours


def write_rtstruct(series: DicomSeries, masks: dict[str, np.ndarray], out: Path, descriptions: dict[str, str],
                   definitions: dict[str, Any], roi_names: str = "display", approved_by: str | None = None,
                   approved_at: datetime | None = None) -> Path:
    """masks: structure -> (slice, row, column) array on the series' grid; empty ones are left out
    (an ROI without contours is rejected by several planning systems). `approved_by`: the reviewer who
    approved these contours (RT Approval module: APPROVED, ReviewerName, ReviewDate/Time); else UNAPPROVED."""
    ds = _structure_set(series.datasets[0])
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame(series)]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, name in enumerate((n for n, m in masks.items() if m.any()), start=1):
        _add_roi(ds, series, number, masks[name], definitions[name], roi_name(definitions[name], roi_names),
                 descriptions.get(name, ""))
    _approval(ds, approved_by, approved_at or datetime.now())

    if "SpecificCharacterSet" not in ds and not all(r.ROIName.isascii() for r in ds.StructureSetROISequence):
        ds.SpecificCharacterSet = "ISO_IR 192"  # the input needed none, our names need UTF-8
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out), enforce_file_format=True)
    return out


def _approval(ds: pydicom.Dataset, approved_by: str | None, at: datetime) -> None:
    """RT Approval module: a draft is UNAPPROVED; an approved set names its reviewer and when, and says so
    where a planning system lists it."""
    if approved_by is None:
        ds.ApprovalStatus = "UNAPPROVED"
        return
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewerName = approved_by
    ds.ReviewDate, ds.ReviewTime = at.strftime("%Y%m%d"), at.strftime("%H%M%S")
    ds.SeriesDescription = ds.StructureSetName = APPROVED_DESCRIPTION


def _structure_set(source: pydicom.Dataset) -> pydicom.Dataset:
    """A new, unapproved draft structure set of the input's patient and study, in a series of its own."""
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = pydicom.Dataset()
    _copy_from_input(ds, source)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = "901"
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = DRAFT_DESCRIPTION
    ds.OperatorsName = ""
    ds.Manufacturer = "autocontour"
    ds.ManufacturerModelName = "autocontour"
    ds.SoftwareVersions = __version__
    ds.StructureSetLabel = "autocontour"  # SH: at most 16 characters
    ds.StructureSetName = DRAFT_DESCRIPTION
    ds.StructureSetDescription = ("Automatic draft contours for review by a qualified clinician; "
                                  "not approved for treatment planning.")
    ds.InstanceNumber = "1"
    ds.StructureSetDate, ds.StructureSetTime = date, time
    return ds


def _referenced_frame(series: DicomSeries) -> pydicom.Dataset:
    """The frame of reference, study and series the contours lie on, with every image of the series."""
    referenced_series = pydicom.Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = [_image_reference(d) for d in series.datasets]
    referenced_study = pydicom.Dataset()
    referenced_study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    referenced_study.ReferencedSOPInstanceUID = series.study_uid
    referenced_study.RTReferencedSeriesSequence = [referenced_series]
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = [referenced_study]
    return frame


def _add_roi(ds: pydicom.Dataset, series: DicomSeries, number: int, mask: np.ndarray, definition: Any, name: str,
             description: str) -> None:
    """One structure's ROI, its contours and its observation, appended to the structure set's sequences."""
    roi = pydicom.Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
    roi.ROIName = name
    roi.ROIDescription = description[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"autocontour {__version__}"
    ds.StructureSetROISequence.append(roi)
    contour = pydicom.Dataset()
    contour.ROIDisplayColor = [int(c) for c in definition.colour]
    contour.ContourSequence = _contours(series, mask.astype(bool))
    contour.ReferencedROINumber = number
    ds.ROIContourSequence.append(contour)
    observation = pydicom.Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.ROIObservationDescription = "automatic draft, not reviewed"
    observation.RTROIInterpretedType = definition.interpreted_type
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence.append(observation)


def read_rtstruct(series: DicomSeries, path: Path) -> dict[str, np.ndarray]:
    """Rasterise an RTSTRUCT's closed contours onto the series the way planning systems do (voxel centres
    inside; a slice's contours combined by XOR): ROI name -> (slice, row, column) bool."""
    ds = pydicom.dcmread(path)
    first = series.datasets[0]
    shape = (len(series.datasets), int(first.Rows), int(first.Columns))
    origins = np.array([_slice_axes(d)[0] for d in series.datasets])
    _, column_step, row_step = _slice_axes(first)
    normal = np.cross(column_step, row_step)
    normal /= np.linalg.norm(normal)
    levels = origins @ normal
    to_pixels = np.linalg.pinv(np.column_stack([column_step, row_step]))  # patient offset -> (column, row)
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    result = {}
    for roi in ds.ROIContourSequence:
        by_slice: dict[int, list[np.ndarray]] = {}
        for contour in getattr(roi, "ContourSequence", []):
            if contour.ContourGeometricType != "CLOSED_PLANAR":
                continue
            points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
            index = int(np.argmin(np.abs(levels - points[0] @ normal)))
            by_slice.setdefault(index, []).append((points - origins[index]) @ to_pixels.T)
        mask = np.zeros(shape, dtype=bool)
        for index, polygons in by_slice.items():
            mask[index] = rasterise(polygons, shape[1:])
        result[names[roi.ReferencedROINumber]] = mask
    return result


def write_seg(series: DicomSeries, masks: dict[str, np.ndarray], out: Path, model: dict,
              support_sets: dict[str, dict], definitions: dict[str, Any]) -> Path:
    """A binary DICOM-SEG with one segment per non-empty structure, labelled with its display name.

    Each segment names the exact inputs that drew it: model and support set, by full SHA-256."""
    names = [n for n, m in masks.items() if m.any()]
    descriptions = []
    for number, name in enumerate(names, start=1):
        definition = definitions[name]
        category, kind = PROPERTY_CODES.get(name) or PROPERTY_CODES_BY_TYPE.get(definition.interpreted_type,
                                                                                 GENERIC_PROPERTY)
        algorithm = hd.AlgorithmIdentificationSequence(
            name="autocontour", version=__version__, family=codes.cid7162.ArtificialIntelligence,
            source=model.get("name", ""),
            parameters={"model_sha256": model.get("sha256", "")[:64],
                        "support_set": support_sets.get(name, {}).get("id", "")[:64],
                        "support_set_sha256": support_sets.get(name, {}).get("content_hash", "")[:64]})
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=definition.display_name, segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    if not names:
        raise ValueError("no structure has any voxel: nothing to write into a DICOM-SEG")
    pixels = np.stack([masks[n].astype(np.uint8) for n in names], axis=-1)  # (frames, rows, columns, segments)
    seg = hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=902, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="autocontour", manufacturer_model_name="autocontour", software_versions=__version__,
        device_serial_number="0", series_description=DRAFT_DESCRIPTION)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out))
    return out


def read_seg(series: DicomSeries, path: Path) -> dict[str, np.ndarray]:
    """Read a SEG back onto the series' slices: segment label -> (slice, row, column) bool."""
    seg = hd.seg.segread(str(path))
    sop_uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    result = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        volume = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sop_uids, segment_numbers=[number], assert_missing_frames_are_empty=True,
            ignore_spatial_locations=True)
        result[label] = volume[..., 0].astype(bool)
    return result
