"""DICOM out: an RTSTRUCT a planning system imports, and a DICOM-SEG, both marked as drafts.

RTSTRUCT (built with rt-utils, then corrected where planning systems are
strict): it references the input series (same study and frame of reference,
every referenced SOP instance), has one ROI per structure with the
catalogue's name and colour and RT ROI Interpreted Type (ORGAN or CTV),
contours on the input's own slice positions, decimal strings of at most 16
characters (longer ones are a known cause of rejected RTSTRUCTs), approval
status UNAPPROVED, and a series description saying "autocontour draft".

DICOM-SEG (highdicom): one binary segment per structure, each carrying the
algorithm identification (name, version, model SHA-256, support-set ids).
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.valuerep import format_number_as_ds
from rt_utils import ds_helper
from rt_utils.rtstruct import RTStruct

from app import __version__
from app.dicom.series import DicomSeries

DRAFT_DESCRIPTION = "autocontour draft - not approved"
RTSTRUCT_FILE = "rtstruct.dcm"
SEG_FILE = "seg.dcm"

# Segmented property (category, type) per structure, SNOMED CT.
_CTV = (codes.SCT.SpatialAndRelationalConcept, codes.SCT.ClinicalTargetVolume)
PROPERTY_CODES = {
    "bladder": (codes.SCT.Organ, hd.sr.CodedConcept("89837001", "SCT", "Urinary bladder")),
    "anorectum": (codes.SCT.Organ, codes.SCT.Rectum),
    "ctvn": _CTV,
    "ctvp": _CTV,
    "parametrium": _CTV,
}


def _generic_codes(definition) -> tuple:
    """Segmented property codes for a structure the SNOMED table does not name: by its RT ROI type."""
    if definition.interpreted_type in ("CTV", "PTV", "GTV"):
        return _CTV
    return codes.SCT.Organ, hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure")


def _rt_utils_mask(mask_zyx: np.ndarray) -> np.ndarray:
    """Our (slice, row, column) arrays -> rt-utils' (row, column, slice)."""
    return np.transpose(mask_zyx.astype(bool), (1, 2, 0))


def _ds16(value: float) -> str:
    return format_number_as_ds(float(value))  # the shortest exact-enough form, at most 16 characters


def write_rtstruct(series: DicomSeries, masks: dict[str, np.ndarray], out: Path, descriptions: dict[str, str],
                   definitions: dict) -> Path:
    """masks: structure -> (slice, row, column) array on the series' grid; definitions: structure ->
    app.catalogue.StructureDefinition (name, colour, RT ROI Interpreted Type)."""
    ds = ds_helper.create_rtstruct_dataset(series.datasets)
    rtstruct = RTStruct(series.datasets, ds)
    for name, mask in masks.items():
        if not mask.any():
            continue  # an empty ROI with no contours is rejected by several planning systems
        structure = definitions[name]
        rtstruct.add_roi(_rt_utils_mask(mask), color=list(structure.colour), name=structure.display_name,
                         description=descriptions.get(name, "")[:64], roi_generation_algorithm="AUTOMATIC")
    kinds = {definitions[n].display_name: definitions[n].interpreted_type for n in masks}
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    for observation in ds.RTROIObservationsSequence:
        observation.RTROIInterpretedType = kinds[names[observation.ReferencedROINumber]]
        observation.ROIInterpreter = ""
        observation.ROIObservationDescription = "automatic draft, not reviewed"
        if hasattr(observation, "private_creators"):
            del observation.private_creators
    for roi_contour in ds.ROIContourSequence:
        for contour in roi_contour.ContourSequence:
            contour.ContourData = [_ds16(v) for v in contour.ContourData]
    ds.SeriesDescription = DRAFT_DESCRIPTION
    ds.StructureSetLabel = "autocontour"  # SH: at most 16 characters
    ds.StructureSetName = DRAFT_DESCRIPTION
    ds.StructureSetDescription = ("Automatic draft contours for review by a qualified clinician; "
                                  "not approved for treatment planning.")
    ds.ApprovalStatus = "UNAPPROVED"
    ds.Manufacturer = "autocontour"
    ds.ManufacturerModelName = "autocontour"
    ds.SoftwareVersions = __version__
    ds.SeriesNumber = "901"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out), enforce_file_format=True)
    return out


def read_rtstruct(series: DicomSeries, path: Path) -> dict[str, np.ndarray]:
    """Rasterise an RTSTRUCT back onto the series: ROI name -> (slice, row, column) bool."""
    rtstruct = RTStruct(series.datasets, pydicom.dcmread(path))
    return {name: np.transpose(rtstruct.get_roi_mask_by_name(name), (2, 0, 1))
            for name in rtstruct.get_roi_names()}


def write_seg(series: DicomSeries, masks: dict[str, np.ndarray], out: Path, model: dict,
              support_sets: dict[str, dict], definitions: dict) -> Path:
    """A binary DICOM-SEG with one segment per non-empty structure.

    Each segment names the exact inputs that drew it: model and support set, by full SHA-256."""
    names = [n for n, m in masks.items() if m.any()]
    descriptions = []
    for number, name in enumerate(names, start=1):
        category, kind = PROPERTY_CODES.get(name) or _generic_codes(definitions[name])
        algorithm = hd.AlgorithmIdentificationSequence(
            name="autocontour", version=__version__, family=codes.cid7162.ArtificialIntelligence,
            source=model.get("name", ""),
            parameters={"model_sha256": model.get("sha256", "")[:64],
                        "support_set": support_sets.get(name, {}).get("id", "")[:64],
                        "support_set_sha256": support_sets.get(name, {}).get("content_hash", "")[:64]})
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=definitions[name].display_name, segmented_property_category=category,
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
