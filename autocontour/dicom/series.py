"""DICOM CT series in: a folder or a zip, checked and turned into one exact 3D image.

Planning systems export a CT as one file per slice, often beside other series
(a scout, an RTSTRUCT, a second reconstruction). This module picks the CT
series (a mixture is refused with its series listed, unless a series UID
picks one), takes blank SOP Instance/Class UIDs from the file meta (where a
PACS indexes them), sorts slices along the
slice normal, checks that they are evenly spaced (a missing slice would
silently stretch the anatomy), and reads pixels with SimpleITK/GDCM, which
applies each slice's rescale slope and intercept and decodes compressed
transfer syntaxes. The headers (without pixel data) stay with the image so
that RTSTRUCT and SEG outputs can reference every source instance.

Zip uploads are checked before extraction: no absolute paths, no `..`, no
links, no encryption, a bounded number of members and of uncompressed bytes
(counted while extracting, not trusted from the header); a corrupt member is
an input error, not a crash. The limits come from the settings
(AUTOCONTOUR_MAX_DICOM_FILES, AUTOCONTOUR_MAX_DICOM_BYTES), so the CLI, the
API's upload check and its workers apply the same ones.
"""

from __future__ import annotations

import hashlib
import stat
import tempfile
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from autocontour.errors import InputImageError
from autocontour.io import decoded_bytes

MAX_FILES = 5000
MAX_BYTES = 4 << 30
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass
class DicomSeries:
    """A CT series: its image, the sorted headers of its slices, and what was noticed."""

    image: sitk.Image
    datasets: list[pydicom.Dataset]  # headers only, in the image's slice order
    files: list[Path]
    warnings: list[str] = field(default_factory=list)
    workdir: tempfile.TemporaryDirectory | None = None  # keeps an extracted zip alive

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)


def is_dicom_input(path: Path) -> bool:
    path = Path(path)
    """A folder, or a file named .zip (whether it truly is a zip is `safe_extract`'s to say)."""
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def safe_extract(archive: Path, target: Path, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES,
                 max_ratio: float | None = None) -> int:
    """Extract a zip after checking its member names, count, size and (with `max_ratio`) how many times
    its own size it inflates to; returns the number of files."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise InputImageError(f"not a readable zip file: {exc}") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        max_bytes = _checked_size(members, archive, max_files, max_bytes, max_ratio)
        _check_member_names(members)
        _extract_members(zf, members, target, max_bytes)
    return len(members)


def _checked_size(members: list[zipfile.ZipInfo], archive: Path, max_files: int, max_bytes: int,
                  max_ratio: float | None) -> int:
    """Refuse a zip whose headers declare too many files or bytes; returns the byte limit for extraction
    (the lower of `max_bytes` and `max_ratio` times the archive's size)."""
    if len(members) > max_files:
        raise InputImageError(f"the zip holds {len(members)} files, more than the limit of {max_files}")
    declared = sum(m.file_size for m in members)
    if declared > max_bytes:
        raise InputImageError(f"the zip inflates to {declared:,} bytes, more than the limit of {max_bytes:,}")
    max_bytes = min(max_bytes, int(max_ratio * archive.stat().st_size)) if max_ratio else max_bytes
    if declared > max_bytes:
        raise InputImageError(f"the zip would inflate {declared / archive.stat().st_size:,.0f} times its size, "
                              f"more than the limit of {max_ratio:g} times")
    return max_bytes


def _check_member_names(members: list[zipfile.ZipInfo]) -> None:
    """Refuse absolute or climbing paths, drive letters, symbolic links and encrypted members."""
    for m in members:
        name = PurePosixPath(m.filename.replace("\\", "/"))
        mode = m.external_attr >> 16
        if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
            raise InputImageError(f"the zip has an unsafe path {m.filename!r}")
        if stat.S_ISLNK(mode):
            raise InputImageError(f"the zip has a symbolic link {m.filename!r}")
        if m.flag_bits & 0x1:
            raise InputImageError(f"the zip has an encrypted member {m.filename!r}; upload it unencrypted")


def _extract_members(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], target: Path, max_bytes: int) -> None:
    """Write the members under numbered names, counting the bytes as they inflate (headers can lie)."""
    written = 0
    for i, m in enumerate(members):
        out = target / f"{i:05d}.dcm"  # never the member's own name: it is not ours to trust
        try:
            with zf.open(m) as source, open(out, "wb") as sink:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        raise InputImageError(f"the zip inflates past the limit of {max_bytes:,} bytes")
                    sink.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise InputImageError(f"the zip is corrupt or unreadable at member {m.filename!r}: {exc}") from exc


def _headers(folder: Path) -> tuple[list[tuple[Path, pydicom.Dataset]], int]:
    found: list[tuple[Path, pydicom.Dataset]] = []
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            found.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError):
            skipped += 1
    return found, skipped


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(orientation[:3], orientation[3:])


def read_series(path: Path, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES,
                max_voxels: int | None = None, max_decoded_bytes: int | None = None, max_ratio: float | None = None,
                scratch: Path | None = None, series_uid: str | None = None) -> DicomSeries:
    """Read the CT series in a folder or zip; raises InputImageError naming any problem.

    `series_uid` picks one of several CT series. `max_voxels` and `max_decoded_bytes` are checked from the
    headers, before any pixel data is decoded; `max_ratio` bounds how much a zip inflates. A zip is extracted
    into `scratch` (default: the system's temporary folder), where the server keeps patient data under its
    data folder."""
    folder, workdir = _input_folder(Path(path), max_files, max_bytes, max_ratio, scratch)
    headers, skipped = _headers(folder)
    if not headers:
        raise InputImageError("no DICOM files found" + (f" ({skipped} other files)" if skipped else ""))
    slices, warnings = _pick_ct_series(headers, skipped, series_uid)
    _check_slice_headers(slices, warnings)
    first = slices[0][1]  # in the files' order: its header gives the size checks
    slices, spacing = _sorted_evenly_spaced(slices)
    _check_decoded_size(first, len(slices), max_voxels, max_decoded_bytes)
    _ensure_uids(slices, warnings)
    files = [str(f) for f, _ in slices]
    image = _read_pixels(files, slices[0][1], spacing)
    return DicomSeries(image, [ds for _, ds in slices], [Path(f) for f in files], warnings, workdir)


def _input_folder(path: Path, max_files: int, max_bytes: int, max_ratio: float | None,
                  scratch: Path | None) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The folder to read: the given one, or a zip extracted into a temporary one (kept alive by the caller)."""
    if path.is_file():
        workdir = tempfile.TemporaryDirectory(prefix="autocontour-dicom-", dir=scratch)
        safe_extract(path, Path(workdir.name), max_files, max_bytes, max_ratio)
        return Path(workdir.name), workdir
    if path.is_dir():
        return path, None
    raise InputImageError(f"not found: {path.name}")


def _is_ct_slice(ds: pydicom.Dataset) -> bool:
    """A classic CT image slice with a position (a blank SOP class counts as CT Image Storage)."""
    return getattr(ds, "Modality", "") == "CT" and str(getattr(ds, "SOPClassUID", "") or CT_IMAGE_STORAGE) in (
        CT_IMAGE_STORAGE, ENHANCED_CT) and "ImagePositionPatient" in ds


def _pick_ct_series(headers: list[tuple[Path, pydicom.Dataset]], skipped: int,
                    series_uid: str | None) -> tuple[list[tuple[Path, pydicom.Dataset]], list[str]]:
    """The slices of the one CT series (or of `series_uid`), and warnings about the files left aside."""
    by_series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    others: set[str] = set()
    for file, ds in headers:
        if _is_ct_slice(ds):
            by_series[str(ds.SeriesInstanceUID)].append((file, ds))
        else:
            others.add(str(getattr(ds, "Modality", "?")))
    if not by_series:
        raise InputImageError(f"no CT series found (modalities present: {', '.join(sorted(others)) or 'none'})")
    listing = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in by_series.items())
    if series_uid is not None:
        if series_uid not in by_series:
            raise InputImageError(f"CT series {series_uid} is not in the input; CT series found: {listing}")
        slices = by_series[series_uid]
    elif len(by_series) > 1:
        raise InputImageError(f"{len(by_series)} CT series found, choose one with --series UID "
                              f"(API: series_uid): {listing}")
    else:
        (slices,) = by_series.values()
    warnings = []
    if others:
        warnings.append(f"ignored non-CT files ({', '.join(sorted(others))})")
    if skipped:
        warnings.append(f"ignored {skipped} non-DICOM file(s)")
    return slices, warnings


def _check_slice_headers(slices: list[tuple[Path, pydicom.Dataset]], warnings: list[str]) -> None:
    """UIDs from the file meta, a SOP class where it was blanked, and one orientation and size throughout."""
    _uids_from_file_meta(slices, warnings)
    first = slices[0][1]
    if not str(getattr(first, "SOPClassUID", "")):
        for _, ds in slices:  # anonymisers sometimes blank it; outputs must reference a class
            ds.SOPClassUID = CT_IMAGE_STORAGE
        warnings.append("the slices have no SOP Class UID; CT Image Storage assumed")
    if str(first.SOPClassUID) == ENHANCED_CT:
        raise InputImageError("enhanced (multi-frame) CT is not supported; export classic CT image storage")
    for _, ds in slices:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient],
                           [float(v) for v in first.ImageOrientationPatient], atol=1e-4):
            raise InputImageError("slices of the series have different orientations (a gantry-tilted or mixed series)")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise InputImageError("slices of the series have different sizes")


def _sorted_evenly_spaced(slices: list[tuple[Path, pydicom.Dataset]]) -> tuple[list[tuple[Path, pydicom.Dataset]],
                                                                                float]:
    """The slices sorted along the slice normal, and their (median) spacing; refuses fewer than 3 slices,
    duplicate positions and uneven spacing (a missing slice would silently stretch the anatomy)."""
    normal = _normal(slices[0][1])
    positions = np.array([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for _, ds in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    if len(slices) < 3:
        raise InputImageError(f"the series has {len(slices)} slice(s); at least 3 are needed")
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        duplicated = positions[1:][steps < 1e-3]
        raise InputImageError(f"duplicate slice positions at {', '.join(f'{p:.2f}' for p in duplicated[:5])} mm")
    median = float(np.median(steps))
    irregular = np.abs(steps - median) > max(0.01 * median, 0.01)
    if irregular.any():
        gaps = [f"{positions[i]:.2f}->{positions[i + 1]:.2f} mm" for i in np.nonzero(irregular)[0][:5]]
        raise InputImageError(f"irregular slice spacing (median {median:.2f} mm): gaps at {', '.join(gaps)}; "
                              "a slice may be missing")
    return slices, median


def _check_decoded_size(first: pydicom.Dataset, count: int, max_voxels: int | None,
                        max_decoded_bytes: int | None) -> None:
    """Refuse, from the headers alone, a series of `count` slices like `first` too large to decode."""
    voxels = int(first.Rows) * int(first.Columns) * count
    if max_voxels is not None and voxels > max_voxels:
        raise InputImageError(f"the image has {voxels:,} voxels, more than the limit of {max_voxels:,}")
    decoded = decoded_bytes(voxels, int(getattr(first, "BitsAllocated", 16)) // 8)
    if max_decoded_bytes is not None and decoded > max_decoded_bytes:
        raise InputImageError(f"the series would take {decoded:,} bytes of memory once decoded, more than the "
                              f"limit of {max_decoded_bytes:,}")


def _read_pixels(files: list[str], first: pydicom.Dataset, spacing: float) -> sitk.Image:
    """The pixels read by SimpleITK/GDCM, checked against the geometry the headers gave."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputImageError(f"cannot read the series' pixels: {str(exc).splitlines()[-1]}") from exc
    expected_origin = [float(v) for v in first.ImagePositionPatient]
    if not np.allclose(image.GetOrigin(), expected_origin, atol=1e-3) or abs(image.GetSpacing()[2] - spacing) > 1e-3:
        raise InputImageError("the series' geometry is inconsistent (origin or slice spacing)")
    return image


def _uids_from_file_meta(slices: list[tuple[Path, pydicom.Dataset]], warnings: list[str]) -> None:
    """Blank SOP Class/Instance UIDs in the datasets, taken from the file meta where it has them: those are
    the UIDs the PACS indexes, so the outputs reference the PACS copy."""
    taken = set()
    for _, ds in slices:
        meta = getattr(ds, "file_meta", pydicom.Dataset())
        for keyword, meta_keyword in (("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                                      ("SOPClassUID", "MediaStorageSOPClassUID")):
            if not str(getattr(ds, keyword, "")) and str(getattr(meta, meta_keyword, "")):
                setattr(ds, keyword, getattr(meta, meta_keyword))
                taken.add(keyword)
    if taken:
        warnings.append(f"the slices' {' and '.join(sorted(taken))} are empty; those of their file meta are used")


def _ensure_uids(slices: list[tuple[Path, pydicom.Dataset]], warnings: list[str]) -> None:
    """Give UIDs to a series whose anonymiser removed them, so outputs can reference its slices.

    The UIDs are derived from the files' contents, so the same series always
    gets the same ones; they cannot match a PACS copy that has other UIDs.
    """
    missing = [key for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
               if not str(getattr(slices[0][1], key, ""))]
    missing_sop = any(not str(getattr(ds, "SOPInstanceUID", "")) for _, ds in slices)
    if not missing and not missing_sop:
        return
    digest = hashlib.sha256(b"".join(hashlib.sha256(Path(f).read_bytes()).digest() for f, _ in slices)).hexdigest()
    for key in missing:
        uid = generate_uid(entropy_srcs=[digest, key])
        for _, ds in slices:
            setattr(ds, key, uid)
    if missing_sop:
        for i, (_, ds) in enumerate(slices):
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[digest, "sop", str(i)])
    warnings.append(f"the series lacks {', '.join(missing + (['SOPInstanceUID'] if missing_sop else []))}; "
                    "deterministic UIDs derived from its contents were assigned and the outputs reference those")
