"""Stage 6: write the files a summary names, and nothing back into it.

The summary is decided first (which files, which warnings); this module only writes: masks and
probabilities (autocontour.export), the preview, the RTSTRUCT and DICOM-SEG of a DICOM input, the CT the
server's review page shows, and last summary.json, once every timing is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autocontour.catalogue import StructureDefinition
from autocontour.dicom.series import DicomSeries
from autocontour.export import write_masks, write_summary
from autocontour.io import CanonicalCT, write_image
from autocontour.pipeline.summary import Summary

REVIEW_CT = Path("review") / "ct.nii.gz"  # for the server's review page; not part of the result zip


@dataclass
class Drawing:
    """What the outputs show: masks on the input's grid and canonical ones for the preview."""

    masks: dict[str, sitk.Image]  # uint8, on the input CT's grid
    probabilities: dict[str, sitk.Image]  # float32, on the input CT's grid (only where asked for)
    canonical_masks: dict[str, np.ndarray]  # bool, canonical (z, y, x)
    definitions: dict[str, StructureDefinition]


def write_outputs(out_dir: Path, summary: Summary, drawing: Drawing, canonical: CanonicalCT,
                  series: DicomSeries | None, roi_names: str, keep_ct: bool) -> dict[str, Path]:
    """Every file but summary.json (see `write_summary`); returns the paths by kind (and structure)."""
    files = write_masks(out_dir, drawing.masks, drawing.probabilities)
    if summary.files.preview:
        files["preview"] = _write_preview(out_dir / summary.files.preview, summary, drawing, canonical)
    if series is not None and summary.files.dicom():
        files |= _write_dicom(out_dir, summary, drawing, series, roi_names)
    if keep_ct:
        files["review_ct"] = out_dir / REVIEW_CT
        write_image(_compact(canonical.input), files["review_ct"])
    return files


def write_summary_json(out_dir: Path, summary: Summary) -> Path:
    """summary.json: the summary's dump, written last, with the final timings."""
    return write_summary(out_dir, summary.model_dump())


def _write_preview(path: Path, summary: Summary, drawing: Drawing, canonical: CanonicalCT) -> Path:
    from autocontour.preview import volume_preview  # matplotlib: only when a preview is asked for

    flagged = {n: [f.slice for f in s.flagged_slices] for n, s in summary.structures.items()}
    return volume_preview(canonical.array, canonical.spacing_zyx, drawing.canonical_masks, path,
                          z_mm=canonical.slice_positions_mm(), flagged=flagged, title="autocontour",
                          definitions=drawing.definitions)


def _write_dicom(out_dir: Path, summary: Summary, drawing: Drawing, series: DicomSeries,
                 roi_names: str) -> dict[str, Path]:
    """RTSTRUCT and DICOM-SEG that reference the input series."""
    from autocontour.dicom.outputs import write_rtstruct, write_seg  # highdicom: only for DICOM input

    arrays = {n: sitk.GetArrayFromImage(m) for n, m in drawing.masks.items()}
    structures = summary.structures
    descriptions = {n: f"draft, confidence {s.confidence}" for n, s in structures.items()}
    support_sets = {n: s.support_set for n, s in structures.items()}
    written = summary.files.dicom()
    return {"rtstruct": write_rtstruct(series, arrays, out_dir / written["rtstruct"], descriptions,
                                       drawing.definitions, roi_names),
            "seg": write_seg(series, arrays, out_dir / written["seg"], summary.model.model_dump(), support_sets,
                             drawing.definitions)}


def _compact(image: sitk.Image) -> sitk.Image:
    """int16 when the HU values are whole numbers in range (CTs are), else as is."""
    values = sitk.GetArrayViewFromImage(image)
    if values.min() >= -32768 and values.max() <= 32767 and np.array_equal(values, np.round(values)):
        return sitk.Cast(image, sitk.sitkInt16)
    return image
