"""DICOM CT series in: a folder or a zip, checked and turned into one exact 3D image.

Planning systems export a CT as one file per slice, often beside other series
(a scout, an RTSTRUCT, a second reconstruction). This module picks the CT
series (a mixture is refused with its series listed, unless a series UID
picks one), takes blank SOP Instance/Class UIDs from the file meta (where a
PACS indexes them), sorts slices along the
slice normal, checks that they are evenly spaced (a missing slice would
silently stretch the anatomy) and stacked straight along that normal (a
gantry-tilted or sheared stack would put the image grid millimetres away from
the slices' own positions, which RTSTRUCT contours use), and reads pixels with
SimpleITK/GDCM, which decodes compressed transfer syntaxes; each slice's own
rescale slope and intercept is applied (slice by slice where they differ).
Headers that would decode to wrong values are refused naming the slice: a
missing position or orientation, orientation vectors that are not unit and
orthogonal, pixel spacings that differ between slices, a RescaleSlope of 0,
PixelData shorter than Rows x Columns needs. Lossy-compressed slices are
decoded with a warning. The headers (without pixel data) stay with the image so
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
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    generate_uid,
)

from autocontour.errors import InputImageError
from autocontour.io import decoded_bytes

MAX_FILES = 5000
MAX_BYTES = 4 << 30
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC, HTJ2K}
DRIFT_TOLERANCE_MM = 0.1  # far above the rounding of positions written as DS, far below a voxel


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
    """A folder, or a file named .zip (whether it truly is a zip is `safe_extract`'s to say)."""
    path = Path(path)
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
        if not members:
            raise InputImageError("the zip is empty: it holds no files")
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
    _check_pixel_data_lengths(slices)
    _ensure_uids(slices, warnings)
    image = _read_pixels(slices, spacing)
    return DicomSeries(image, [ds for _, ds in slices], [f for f, _ in slices], warnings, workdir)


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
    """A CT image, classic or enhanced (a blank SOP class counts as CT Image Storage); one without a position
    stays in its series, to be refused naming the missing attribute rather than leaving a silent gap."""
    return getattr(ds, "Modality", "") == "CT" and str(getattr(ds, "SOPClassUID", "") or CT_IMAGE_STORAGE) in (
        CT_IMAGE_STORAGE, ENHANCED_CT)


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
    """UIDs from the file meta, a SOP class where it was blanked, then the geometry and rescale every slice
    must agree on before any pixel is decoded."""
    _uids_from_file_meta(slices, warnings)
    first = slices[0][1]
    if not str(getattr(first, "SOPClassUID", "")):
        for _, ds in slices:  # anonymisers sometimes blank it; outputs must reference a class
            ds.SOPClassUID = CT_IMAGE_STORAGE
        warnings.append("the slices have no SOP Class UID; CT Image Storage assumed")
    if any(str(ds.SOPClassUID) == ENHANCED_CT for _, ds in slices):
        raise InputImageError("enhanced (multi-frame) CT is not supported; export classic CT image storage")
    _check_geometry_attributes(slices)
    _check_rescale_slopes(slices)
    _warn_lossy(slices, warnings)


def _slice_name(file: Path, ds: pydicom.Dataset) -> str:
    """How a refusal names a slice: its file, and its instance number where it has one."""
    number = getattr(ds, "InstanceNumber", None)
    return f"{file.name}" + (f" (instance {number})" if number not in (None, "") else "")


def _floats(ds: pydicom.Dataset, keyword: str, count: int, file: Path) -> np.ndarray:
    """A multi-valued header as floats; refuses it missing, blank or with the wrong number of values, since
    SimpleITK would otherwise fail with a traceback or read a default."""
    value = getattr(ds, keyword, None)
    if value is None or value == "" or (isinstance(value, (list, pydicom.multival.MultiValue)) and not value):
        raise InputImageError(f"slice {_slice_name(file, ds)} has no {keyword}; the series cannot be placed")
    values = list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
    if len(values) != count:
        raise InputImageError(f"slice {_slice_name(file, ds)} has {len(values)} {keyword} values, not {count}")
    return np.array([float(v) for v in values])


def _check_geometry_attributes(slices: list[tuple[Path, pydicom.Dataset]]) -> None:
    """Every slice placed (position, orientation: two unit vectors at right angles) and sampled alike
    (orientation, size, pixel spacing): the image has one grid, so a slice that differs would be drawn on
    the wrong one."""
    first_file, first = slices[0]
    orientation = _floats(first, "ImageOrientationPatient", 6, first_file)
    spacing = _floats(first, "PixelSpacing", 2, first_file)
    for file, ds in slices:
        _floats(ds, "ImagePositionPatient", 3, file)
        own = _floats(ds, "ImageOrientationPatient", 6, file)
        row, column = own[:3], own[3:]
        if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(column) - 1) > 1e-3
                or abs(np.dot(row, column)) > 1e-3):
            raise InputImageError(f"the ImageOrientationPatient of slice {_slice_name(file, ds)} is not two unit "
                                  f"vectors at right angles: {', '.join(f'{v:g}' for v in own)}")
        if not np.allclose(own, orientation, atol=1e-4):
            raise InputImageError("slices of the series have different orientations (a gantry-tilted or mixed series)")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise InputImageError("slices of the series have different sizes")
        own_spacing = _floats(ds, "PixelSpacing", 2, file)
        if not np.allclose(own_spacing, spacing, atol=1e-4):
            raise InputImageError(f"slices of the series have different pixel spacings: {spacing[0]:g} x "
                                  f"{spacing[1]:g} mm in {_slice_name(first_file, first)}, {own_spacing[0]:g} x "
                                  f"{own_spacing[1]:g} mm in {_slice_name(file, ds)}")


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    """A slice's (RescaleSlope, RescaleIntercept); absent or blank ones are the identity, as GDCM reads them."""
    slope, intercept = getattr(ds, "RescaleSlope", None), getattr(ds, "RescaleIntercept", None)
    return (1.0 if slope in (None, "") else float(slope)), (0.0 if intercept in (None, "") else float(intercept))


def _check_rescale_slopes(slices: list[tuple[Path, pydicom.Dataset]]) -> None:
    """Refuse a RescaleSlope of 0: every pixel would be the intercept, and GDCM silently decodes it as 1."""
    zero = [_slice_name(f, ds) for f, ds in slices if _rescale(ds)[0] == 0]
    if zero:
        raise InputImageError(f"RescaleSlope is 0 in {len(zero)} slice(s) (e.g. {zero[0]}): their Hounsfield "
                              "units cannot be decoded")


def _warn_lossy(slices: list[tuple[Path, pydicom.Dataset]], warnings: list[str]) -> None:
    """Say when pixels were lossy-compressed (a lossy transfer syntax, or LossyImageCompression "01"): they
    decode, but to approximations of the scanner's Hounsfield units."""
    reasons = set()
    for _, ds in slices:
        syntax = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""))
        if syntax in LOSSY_SYNTAXES:
            reasons.add(f"transfer syntax {syntax.name}")
        if str(getattr(ds, "LossyImageCompression", "")) == "01":
            reasons.add('LossyImageCompression "01"')
    if reasons:
        warnings.append(f"the pixels are or may be lossy-compressed ({'; '.join(sorted(reasons))}): the Hounsfield "
                        "units carry compression error; check the contours")


def _check_pixel_data_lengths(slices: list[tuple[Path, pydicom.Dataset]]) -> None:
    """Refuse a natively encoded slice whose PixelData is shorter than Rows x Columns x BitsAllocated/8: GDCM
    fills the missing part in, off by up to the whole HU range. (Compressed slices fail in the decoder.)"""
    for file, ds in slices:
        syntax = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""))
        if not syntax or syntax.is_compressed:
            continue
        needed = (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1)
                  * int(getattr(ds, "BitsAllocated", 16)) // 8)
        held = len(pydicom.dcmread(file).get("PixelData", b"") or b"")
        if held < needed:
            raise InputImageError(f"the PixelData of slice {_slice_name(file, ds)} holds {held:,} bytes, fewer than "
                                  f"the {needed:,} its Rows x Columns x BitsAllocated/8 need: a truncated slice")


def _sorted_evenly_spaced(slices: list[tuple[Path, pydicom.Dataset]]) -> tuple[list[tuple[Path, pydicom.Dataset]],
                                                                                float]:
    """The slices sorted along the slice normal, and their (median) spacing; refuses fewer than 3 slices,
    duplicate positions, a stack that is not straight along the normal, and uneven spacing (a missing slice
    would silently stretch the anatomy)."""
    normal = _normal(slices[0][1])
    points = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    positions = points @ normal
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions, points = positions[order], points[order]
    if len(slices) < 3:
        raise InputImageError(f"the series has {len(slices)} slice(s); at least 3 are needed")
    steps = np.diff(positions)
    if np.any(steps < 1e-3):
        duplicated = positions[1:][steps < 1e-3]
        raise InputImageError(f"duplicate slice positions at {', '.join(f'{p:.2f}' for p in duplicated[:5])} mm")
    _check_straight_stack(points, normal)
    median = float(np.median(steps))
    irregular = np.abs(steps - median) > max(0.01 * median, 0.01)
    if irregular.any():
        gaps = [f"{positions[i]:.2f}->{positions[i + 1]:.2f} mm" for i in np.nonzero(irregular)[0][:5]]
        raise InputImageError(f"irregular slice spacing (median {median:.2f} mm): gaps at {', '.join(gaps)}; "
                              "a slice may be missing")
    return slices, median


def _check_straight_stack(points: np.ndarray, normal: np.ndarray) -> None:
    """Refuse slices (sorted, positions `points`) that do not lie on the line through the first one along
    the normal: the image grid is that line, while RTSTRUCT contours sit on each slice's own position.

    In-plane offsets growing linearly along the stack are a gantry tilt or shear; others are slices
    shifted out of one stack."""
    along = (points - points[0]) @ normal
    offsets = (points - points[0]) - np.outer(along, normal)
    drift = np.linalg.norm(offsets, axis=1)
    if drift.max() <= DRIFT_TOLERANCE_MM:
        return
    slope = along @ offsets / (along @ along)
    residual = np.linalg.norm(offsets - np.outer(along, slope), axis=1)
    if residual.max() <= DRIFT_TOLERANCE_MM:
        raise InputImageError(f"the slices drift in-plane by up to {drift.max():.2f} mm along the stack: a "
                              "gantry-tilted or sheared series; reconstruct it without tilt")
    worst = int(np.argmax(residual))
    raise InputImageError(f"the slices are shifted in-plane by up to {drift.max():.2f} mm from one another (e.g. "
                          f"the slice at {points[worst] @ normal:.2f} mm along the normal): they do not form one "
                          "straight stack")


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


def _read_pixels(slices: list[tuple[Path, pydicom.Dataset]], spacing: float) -> sitk.Image:
    """The pixels read by SimpleITK/GDCM, checked against the geometry the headers gave: in one series read
    where every slice shares one rescale, else slice by slice so that each slice's own rescale is applied
    (a series read was seen applying one slice's to all, legal series coming out off by thousands of HU; the
    per-slice read does not depend on which ITK/GDCM version does or does not do that)."""
    files = [str(f) for f, _ in slices]
    try:
        if len({_rescale(ds) for _, ds in slices}) == 1:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = _read_slice_by_slice(files, spacing)
    except RuntimeError as exc:
        raise InputImageError(f"cannot read the series' pixels: {str(exc).splitlines()[-1]}") from exc
    first = slices[0][1]
    expected_origin = [float(v) for v in first.ImagePositionPatient]
    if not np.allclose(image.GetOrigin(), expected_origin, atol=1e-3) or abs(image.GetSpacing()[2] - spacing) > 1e-3:
        raise InputImageError("the series' geometry is inconsistent (origin or slice spacing)")
    return image


def _read_slice_by_slice(files: list[str], spacing: float) -> sitk.Image:
    """Each file decoded on its own (GDCM applies its own rescale), stacked on the first slice's geometry;
    int16 where every value is a whole number in its range, else float32 (filled slice by slice, so the
    volume is never held as float64)."""
    first = sitk.ReadImage(files[0], sitk.sitkFloat64)
    hu = np.empty((len(files), *sitk.GetArrayViewFromImage(first).shape[1:]), np.float32)
    for i, file in enumerate(files):
        hu[i] = sitk.GetArrayFromImage(sitk.ReadImage(file, sitk.sitkFloat64))[0]
    exact = np.array_equal(hu, np.round(hu)) and hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(
        np.int16).max
    image = sitk.GetImageFromArray(hu.astype(np.int16 if exact else np.float32))
    image.SetOrigin(first.GetOrigin())
    image.SetDirection(first.GetDirection())
    image.SetSpacing((*first.GetSpacing()[:2], spacing))
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
    sop_uids = [str(getattr(ds, "SOPInstanceUID", "")) for _, ds in slices]
    missing_sop = not all(sop_uids)
    shared_sop = not missing_sop and len(set(sop_uids)) < len(sop_uids)  # outputs would reference one for several
    if not missing and not missing_sop and not shared_sop:
        return
    digest = hashlib.sha256(b"".join(hashlib.sha256(Path(f).read_bytes()).digest() for f, _ in slices)).hexdigest()
    for key in missing:
        uid = generate_uid(entropy_srcs=[digest, key])
        for _, ds in slices:
            setattr(ds, key, uid)
    if missing_sop or shared_sop:
        for i, (_, ds) in enumerate(slices):
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[digest, "sop", str(i)])
    lacking = missing + (["SOPInstanceUID"] if missing_sop else [])
    reasons = ([f"the series lacks {', '.join(lacking)}"] if lacking else []) + (
        [f"the slices' SOP Instance UIDs are not unique ({len(set(sop_uids))} distinct for {len(sop_uids)} slices)"]
        if shared_sop else [])
    warnings.append(f"{' and '.join(reasons)}; deterministic UIDs derived from its contents were assigned and the "
                    "outputs reference those")
