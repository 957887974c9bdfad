"""The one CT reader of every entry point (CLI, Python API, the server's upload check and its workers).

It sits beside the DICOM series reader because it is the one place that tells the two input forms apart:
a DICOM series (a folder or zip) goes through `read_series`, anything else is read as NIfTI by
`autocontour.io`; both with every check and limit of the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import SimpleITK as sitk

from autocontour.config import Settings
from autocontour.dicom.series import DicomSeries, is_dicom_input, read_series
from autocontour.io import read_ct, validate_ct


def read_input(path: Path, settings: Settings, series_uid: str | None = None) -> tuple[sitk.Image, DicomSeries | None]:
    """A CT from a NIfTI file or a DICOM series (folder or zip; `series_uid` picks one of several), with every
    check and limit of the settings; the series too when the input was DICOM (its outputs reference it)."""
    limits: dict[str, Any] = {"max_voxels": settings.max_voxels, "max_decoded_bytes": settings.max_decoded_bytes,
                              "max_ratio": settings.max_compression_ratio}
    if is_dicom_input(path):
        series = read_series(path, settings.max_dicom_files, settings.max_dicom_bytes, **limits,
                             scratch=settings.scratch_dir, series_uid=series_uid)
        return validate_ct(series.image), series
    return read_ct(path, **limits), None
