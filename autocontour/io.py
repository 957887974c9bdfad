"""Stage 1: read a CT safely and bring it to one canonical orientation.

A planning CT arrives as NIfTI in any orientation. Everything downstream
(slicing, support sets, the model) works on one canonical orientation, LPS:
array index (z, y, x) runs inferior->superior, anterior->posterior and
right->left, so an axial slice shows the patient as radiologists view it.
`CanonicalCT.to_input_grid` maps results back onto the input's exact grid.

Reading is defensive because ITK reads a truncated .nii.gz without complaint
(the missing voxels become zeros): the file is checked completely before it
is handed to SimpleITK, and the header is checked before anything is inflated.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from autocontour.errors import InputImageError

CANONICAL_ORIENTATION = "LPS"
MIN_SPACING_MM, MAX_SPACING_MM = 0.05, 20.0
MIN_AXIAL_SLICES = 3
DEFAULT_MAX_VOXELS = 1024 * 1024 * 1024  # 1 Gi voxels: larger than any planning CT
QFORM_SFORM_TOLERANCE_MM = 0.5  # rounding in either transform stays far below this
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# header class -> (offset, bytes) of the magic string of a single-file image
MAGIC = {nib.Nifti1Header: (344, b"n+1\0"), nib.Nifti2Header: (4, b"n+2\0\r\n\x1a\n")}
VERSION = {nib.Nifti1Header: "NIfTI-1", nib.Nifti2Header: "NIfTI-2"}


@dataclass(frozen=True)
class NiftiInfo:
    """What the header promises, read before any voxel is inflated."""

    shape: tuple[int, ...]
    dtype: np.dtype
    data_bytes: int
    data_offset: int
    compressed: bool
    slope: float = 1.0  # scl_slope and scl_inter, as the readers apply them
    inter: float = 0.0
    decode_dtype: np.dtype | None = None  # the smallest type that holds the (scaled) values, once scanned


def inspect_nifti(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS, max_decoded_bytes: int | None = None,
                  max_ratio: float | None = None) -> NiftiInfo:
    """Check that `path` is a complete NIfTI file of a sane size; read only what that needs.

    Raises InputImageError naming the problem: empty file, not NIfTI,
    truncated or corrupt gzip, geometry the readers would repair, and what
    the file would cost: too many voxels, more than `max_decoded_bytes` once
    decoded (`decoded_bytes`), or a gzip that inflates more than `max_ratio`
    times its size. All three are checked from the header, before inflating:
    a 1 MB .nii.gz can claim gigabytes.
    """
    path = Path(path)
    header, compressed, size = _read_header(path)
    info = _header_info(header, compressed, max_voxels)
    needed = _check_cost(info, size, max_decoded_bytes, max_ratio)
    _check_extensions(path, header, info)
    scan = _Scan(info)
    read = _stream_data(path, info, limit=needed + (1 << 20), consume=scan.add)
    if read < needed:
        raise InputImageError(_truncated(read, info))
    if not scan.finite:
        raise InputImageError("the image contains NaN or infinite values")
    return dataclasses.replace(info, decode_dtype=scan.smallest_dtype())


def _read_header(path: Path) -> tuple[nib.Nifti1Header, bool, int]:
    """The NIfTI header as stored (nibabel would repair pixdim), whether the file is gzipped, and its size."""
    if not path.is_file():
        raise InputImageError(f"file not found: {path.name}")
    size = path.stat().st_size
    if size == 0:
        raise InputImageError("the file is empty (0 bytes)")
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise InputImageError("not a NIfTI file: too short for a header")
            header_class, endianness = _header_class(head)
            block = head + f.read(header_class.template_dtype.itemsize - 4)
            if len(block) < header_class.template_dtype.itemsize:
                raise InputImageError("not a NIfTI file: too short for a header")
            _check_magic(header_class, block)
            # as stored (nibabel would repair pixdim), in the byte order sizeof_hdr gave (nibabel guesses it
            # from dim[0]), without the extensions (checked once the file's cost is known: `_check_extensions`)
            header = header_class(block, endianness, check=False)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputImageError(f"not a readable NIfTI file: {_gzip_reason(exc)}") from exc
    except InputImageError:
        raise
    except Exception as exc:  # nibabel's HeaderDataError and friends
        raise InputImageError(f"corrupt NIfTI header: {exc}") from exc
    return header, compressed, size


def _header_info(header: nib.Nifti1Header, compressed: bool, max_voxels: int) -> NiftiInfo:
    """What the header says, checked: a sane shape within `max_voxels`, geometry, one number per voxel."""
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise InputImageError(f"the header's dim[0] (the number of dimensions) is {ndim}; it must be 1 to 7")
    try:  # read unchecked, so a nonsensical dim, datatype or offset is found here
        shape = tuple(int(d) for d in header.get_data_shape())
        dtype, data_offset = header.get_data_dtype(), int(header.get_data_offset())
    except Exception as exc:
        raise InputImageError(f"corrupt NIfTI header: {exc}") from exc
    if any(d <= 0 for d in shape) or not shape:
        raise InputImageError(f"the image has a zero or negative dimension: {shape}")
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels > max_voxels:
        raise InputImageError(f"the image has {n_voxels:,} voxels, more than the limit of {max_voxels:,}")
    check_header_geometry(header, len(shape))
    if dtype.kind not in "iuf":
        raise InputImageError(f"the image has {dtype.kind!r} voxels (vector, complex or RGB); a CT has one number "
                              "per voxel")
    slope, inter = (float(v) if v is not None else None for v in header.get_slope_inter())
    return NiftiInfo(shape, dtype, n_voxels * dtype.itemsize, data_offset, compressed,
                     slope if slope is not None else 1.0, inter if inter is not None and slope is not None else 0.0)


def _check_cost(info: NiftiInfo, size: int, max_decoded_bytes: int | None, max_ratio: float | None) -> int:
    """Refuse, from the header, a file too costly to decode or inflate, or one shorter than its data; returns
    the bytes the file must hold."""
    n_voxels = int(np.prod(info.shape, dtype=np.int64))
    itemsize = info.dtype.itemsize
    if max_decoded_bytes is not None and decoded_bytes(n_voxels, itemsize) > max_decoded_bytes:
        raise InputImageError(
            f"the image would take {decoded_bytes(n_voxels, itemsize):,} bytes of memory once decoded "
            f"({n_voxels:,} voxels of {itemsize} bytes stored), more than the limit of {max_decoded_bytes:,}")
    needed = info.data_offset + info.data_bytes
    if info.compressed and max_ratio is not None and needed > max_ratio * size:
        raise InputImageError(f"the file would inflate {needed / size:,.0f} times its size ({size:,} to {needed:,} "
                              f"bytes), more than the limit of {max_ratio:g} times")
    if not info.compressed and size < needed:
        raise InputImageError(_truncated(size, info))
    return needed


def _truncated(held: int, info: NiftiInfo) -> str:
    """A truncated file, and where its header says the voxels lie (a corrupt vox_offset also ends here)."""
    return (f"the file is truncated: it holds {held:,} of the {info.data_offset + info.data_bytes:,} bytes its header "
            f"promises ({info.data_bytes:,} bytes of voxels from byte {info.data_offset:,}, its vox_offset)")


def _check_extensions(path: Path, header: nib.Nifti1Header, info: NiftiInfo) -> None:
    """Refuse voxels placed inside the header, and header extensions that run past the voxels' start.

    Readers disagree on a broken extension chain (nibabel stops with a read error, ITK skips the rest), and
    either way the file was damaged or written wrong: which of its bytes are voxels is uncertain. Only the
    extensions' sizes are read, after `_check_cost` has bounded what skipping their contents inflates.
    """
    start = header.single_vox_offset  # the header, then 4 bytes saying whether extensions follow
    if info.data_offset < start:
        raise InputImageError(f"the header's vox_offset ({info.data_offset}) places the voxels inside the header; "
                              f"a single-file image stores them from byte {start} on")
    opener = gzip.open if info.compressed else open
    with opener(path, "rb") as f:
        f.seek(start - 4)
        if f.read(1) in (b"", b"\0"):
            return
        position = start
        while info.data_offset - position >= 16:  # each extension takes a multiple of 16 bytes
            f.seek(position)
            if len(raw := f.read(4)) < 4:
                raise InputImageError("the file is truncated inside its header extensions")
            esize = struct.unpack(header.endianness + "i", raw)[0]
            if esize < 16 or position + esize > info.data_offset:
                raise InputImageError(
                    f"the header extension at byte {position:,} claims {esize:,} bytes, but "
                    + ("an extension takes at least 16" if esize < 16 else
                       f"the voxels start at byte {info.data_offset:,} (vox_offset)") + ": a corrupt header extension")
            position += esize


def decoded_bytes(voxels: int, stored_bytes_per_voxel: int) -> int:
    """The peak memory of reading one CT, at most: the voxels decoded as the smallest type that holds them
    (no wider than float32, whatever is stored) are held twice while they become an image (the array and
    the image's buffer; a DICOM reader's buffer and its image), then once beside the float32 copy the
    pipeline works on."""
    decoded = min(stored_bytes_per_voxel, 4)
    return voxels * (decoded + max(decoded, 4))


def check_header_geometry(header, ndim: int) -> None:
    """Refuse geometry the readers would silently repair, naming the header field.

    SimpleITK and nibabel turn a zero or NaN pixdim into 1 mm and make up an
    orientation when neither qform nor sform is set: the volume is then wrong
    (a bladder of 203 instead of 505 mL) with no warning. So the header is
    checked as stored, before any reader sees it.
    """
    pixdim = np.asarray(header["pixdim"], dtype=np.float64)
    for axis in range(1, min(ndim, 3) + 1):
        if not (np.isfinite(pixdim[axis]) and pixdim[axis] > 0):
            raise InputImageError(f"the header's voxel spacing pixdim[{axis}] is {pixdim[axis]:g}; "
                                  "it must be a positive, finite number of mm")
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if qform_code <= 0 and sform_code <= 0:
        raise InputImageError("the header has neither a qform nor an sform (qform_code = sform_code = 0): "
                              "the scan's orientation and position are unknown")
    if qform_code > 0:
        quaternion = np.array([header[k] for k in ("quatern_b", "quatern_c", "quatern_d")], dtype=np.float64)
        offset = np.array([header[k] for k in ("qoffset_x", "qoffset_y", "qoffset_z")], dtype=np.float64)
        if not (np.isfinite(quaternion).all() and np.isfinite(offset).all()) or quaternion @ quaternion > 1 + 1e-6:
            raise InputImageError("the header's qform is degenerate (quatern_b/c/d or qoffset_x/y/z not finite, "
                                  "or not a rotation)")
    if sform_code > 0:
        rows = np.array([header[k] for k in ("srow_x", "srow_y", "srow_z")], dtype=np.float64)
        if not np.isfinite(rows).all() or abs(np.linalg.det(rows[:, :3])) < 1e-9:
            raise InputImageError("the header's sform is degenerate (srow_x/y/z not finite, or a singular matrix)")
        _check_sform_agrees(header, rows, pixdim[1:4], qform_code > 0)


def _check_sform_agrees(header, rows: np.ndarray, pixdim: np.ndarray, has_qform: bool) -> None:
    """Refuse a header whose two descriptions of the grid disagree, naming both.

    ITK takes the voxel size from pixdim and the orientation from the sform (with only a warning about
    "unexpected scales"), so a pixdim of 1 mm beside an sform of 3 mm voxels reads the scan at a third of
    its size (a bladder of 259 instead of 566 mL); and when qform and sform place the volume differently,
    one of them silently wins. Neither can be resolved without knowing which one the writer meant.
    """
    sform_spacing = np.linalg.norm(rows[:, :3], axis=0)
    if not np.allclose(sform_spacing, pixdim, rtol=1e-3, atol=1e-4):
        raise InputImageError(
            f"the header's voxel size disagrees with itself: pixdim says {_mm(pixdim)} mm, the sform "
            f"{_mm(sform_spacing)} mm; rewrite the file with one geometry (e.g. nibabel's img.set_sform / set_qform)")
    if has_qform:
        shape = np.array([int(header["dim"][axis]) for axis in (1, 2, 3)])
        corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * np.r_[shape - 1, 1]
        apart = np.linalg.norm((corners @ header.get_qform().T - corners @ np.r_[rows, [[0, 0, 0, 1]]].T)[:, :3],
                               axis=1).max()
        if apart > QFORM_SFORM_TOLERANCE_MM:
            raise InputImageError(f"the header's qform and sform place the scan up to {apart:.1f} mm apart; "
                                  "rewrite the file with one geometry (e.g. nibabel's img.set_sform / set_qform)")


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{v:g}" for v in np.round(values, 4))


class _Scan:
    """What the data holds, seen chunk by chunk: whether all values are finite, their range, whether whole."""

    def __init__(self, info: NiftiInfo):
        self.info, self.finite, self.whole = info, True, True
        self.low, self.high = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        values = _scaled(values, self.info)
        if values.size == 0:
            return
        low, high = values.min(), values.max()
        if not (np.isfinite(low) and np.isfinite(high)):  # NaN and inf reach min or max
            self.finite = False
            return
        self.low, self.high = min(self.low, float(low)), max(self.high, float(high))
        if self.whole and values.dtype.kind == "f":
            self.whole = bool(np.array_equal(values, np.round(values)))

    def smallest_dtype(self) -> np.dtype:
        """int16 for whole numbers in its range (CTs in HU), the stored type if it is narrower, else float32."""
        stored = self.info.dtype.newbyteorder("=")
        if self.info.slope == 1 and self.info.inter == 0 and stored.kind in "iu" and stored.itemsize <= 2:
            return stored
        if self.whole and -32768 <= self.low and self.high <= 32767:
            return np.dtype(np.int16)
        return np.dtype(np.float32)


def _scaled(values: np.ndarray, info: NiftiInfo) -> np.ndarray:
    if info.slope == 1 and info.inter == 0:
        return values
    return values * np.float64(info.slope) + np.float64(info.inter)


def _stream_data(path: Path, info: NiftiInfo, limit: int, consume) -> int:
    """Read the whole file as a stream (checking the gzip CRC), handing the voxels to `consume` chunk by chunk,
    in file order; returns the bytes read. Stops with an error past `limit` bytes.

    ITK silently turns a NaN stored in NIfTI into a number, so this is the
    only place a NaN can be caught.
    """
    total, pending = 0, b""
    opener = gzip.open if info.compressed else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 22):
                start = max(0, info.data_offset - total)
                total += len(chunk)
                if total > limit:
                    raise InputImageError("the compressed file inflates past the size its header promises")
                if start < len(chunk):
                    data = pending + chunk[start:]
                    usable = min(len(data) - len(data) % info.dtype.itemsize,
                                 max(0, info.data_offset + info.data_bytes - (total - len(data))))
                    consume(np.frombuffer(data[:usable], dtype=info.dtype))
                    pending = data[usable:]
    except (OSError, EOFError, zlib.error) as exc:
        raise InputImageError(f"the file is truncated or corrupt: {_gzip_reason(exc)}") from exc
    return total


def _decode(path: Path, info: NiftiInfo) -> np.ndarray:
    """The voxels, scaled, as `info.decode_dtype`, in file order (x fastest, as an ITK image buffer)."""
    n_voxels = info.data_bytes // info.dtype.itemsize
    out = np.empty(n_voxels, dtype=info.decode_dtype)
    filled = 0

    def fill(values: np.ndarray) -> None:
        nonlocal filled
        values = values[: n_voxels - filled]
        out[filled:filled + values.size] = _scaled(values, info)
        filled += values.size

    _stream_data(path, info, limit=info.data_offset + info.data_bytes + (1 << 20), consume=fill)
    return out


def _header_class(first4: bytes) -> tuple[type[nib.Nifti1Header], str]:
    """The header's class and byte order, from sizeof_hdr (348: NIfTI-1, 540: NIfTI-2)."""
    for cls, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for order in "<>":
            if struct.unpack(order + "i", first4)[0] == size:
                return cls, order
    raise InputImageError("not a NIfTI file (its first bytes are not a NIfTI-1 or NIfTI-2 header)")


def _check_magic(header_class: type[nib.Nifti1Header], block: bytes) -> None:
    """Refuse a header whose magic is not that of a single-file NIfTI.

    ITK reads a header without the magic as Analyze 7.5, ignoring its qform and sform: origin (0, 0, 0)
    and x flipped (a bladder of 326 instead of 566 mL), with no word said. "ni1" is the header of a
    .hdr/.img pair, whose voxels lie in another file.
    """
    offset, expected = MAGIC[header_class]
    found = block[offset:offset + len(expected)]
    if found != expected:
        raise InputImageError(
            f"the header's magic string is {found!r}, not the {expected[:3].decode()!r} of a single-file "
            f"{VERSION[header_class]} file: a corrupted header, or an Analyze or two-file (.hdr/.img) image, "
            "whose orientation and origin readers would make up")


def _gzip_reason(exc: Exception) -> str:
    if isinstance(exc, EOFError):
        return "the gzip stream ends early (truncated file)"
    return str(exc) or type(exc).__name__


def read_image(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS, max_decoded_bytes: int | None = None,
               max_ratio: float | None = None) -> sitk.Image:
    """Read a NIfTI image after `inspect_nifti` has vouched for it (with these limits)."""
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputImageError(f"expected a .nii or .nii.gz file, got {path.suffix or 'no extension'!r}")
    info = inspect_nifti(path, max_voxels, max_decoded_bytes, max_ratio)
    if len(info.shape) == 2:
        raise InputImageError(f"the image is 2D {info.shape}; a CT volume is 3D")
    if len(info.shape) > 3 and any(d > 1 for d in info.shape[3:]):
        raise InputImageError(f"the image is {len(info.shape)}D {info.shape}; give one 3D CT volume")
    header = _read_header(path)[0]
    if isinstance(header, nib.Nifti2Header):
        spacing, origin, direction = _nifti2_geometry(header)
    else:
        spacing, origin, direction = _itk_geometry(path)
    x, y, z = info.shape[:3]
    image = sitk.GetImageFromArray(_decode(path, info).reshape(z, y, x))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


Geometry = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # spacing, origin, direction (LPS)


def _itk_geometry(path: Path) -> Geometry:
    """The geometry of a NIfTI-1 file as ITK reads it (qform or sform, in LPS); the voxels are ours."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputImageError(f"SimpleITK cannot read the image: {str(exc).splitlines()[-1]}") from exc
    if reader.GetNumberOfComponents() != 1:
        raise InputImageError("the image has vector (multi-component) voxels; a CT has one value per voxel")
    dim = reader.GetDimension()
    return (reader.GetSpacing()[:3], reader.GetOrigin()[:3],
            tuple(np.array(reader.GetDirection()).reshape(dim, dim)[:3, :3].ravel().tolist()))


def _nifti2_geometry(header: nib.Nifti2Header) -> Geometry:
    """The geometry of a NIfTI-2 file, which ITK cannot read, from nibabel's affine: the sform where set, else
    the qform (`check_header_geometry` has made sure that the two agree and that pixdim agrees with the sform).
    NIfTI's world is RAS, ITK's LPS: the first two rows change sign."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ header.get_best_affine()[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    direction = lps[:, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:, 3].tolist()), tuple(direction.ravel().tolist())


def read_ct(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS, max_decoded_bytes: int | None = None,
            max_ratio: float | None = None) -> sitk.Image:
    """Read and validate a CT volume in Hounsfield units; returns float32."""
    return validate_ct(read_image(path, max_voxels, max_decoded_bytes, max_ratio))


def validate_ct(image: sitk.Image) -> sitk.Image:
    """Check an image already in memory the way a file is checked; returns float32."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError("the image has vector (multi-component) voxels; a CT has one value per voxel")
    check_geometry(image)
    ct = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(ct)
    if not np.isfinite([values.min(), values.max()]).all():  # NaN and inf reach min or max; no voxel-sized mask
        raise InputImageError("the image contains NaN or infinite values")
    check_looks_like_ct(values)
    return ct


def check_geometry(image: sitk.Image) -> None:
    """Reject geometry that no scanner produces."""
    size, spacing = image.GetSize(), image.GetSpacing()
    if image.GetDimension() != 3:
        raise InputImageError(f"expected a 3D image, got {image.GetDimension()}D")
    if not all(MIN_SPACING_MM <= s <= MAX_SPACING_MM for s in spacing):
        raise InputImageError(
            f"absurd voxel spacing {tuple(round(s, 4) for s in spacing)} mm: each must lie within "
            f"{MIN_SPACING_MM}..{MAX_SPACING_MM} mm")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-3):
        raise InputImageError("the direction matrix is not orthonormal")
    if not np.isfinite(image.GetOrigin()).all():
        raise InputImageError("the image origin is not finite")
    axial_axis = int(np.argmax(np.abs(direction[2, :])))
    if size[axial_axis] < MIN_AXIAL_SLICES:
        raise InputImageError(f"the image has {size[axial_axis]} axial slice(s); "
                              f"at least {MIN_AXIAL_SLICES} are needed")


AIR_CEILING_HU = -900  # air and its noise lie below; fat, soft tissue and bone far above


def check_looks_like_ct(values: np.ndarray) -> None:
    """A CT in Hounsfield units shows air (about -1000 HU) around the patient.

    Catches the usual mix-ups: a label map, an MR, an image scaled to 0..1 or
    0..255, or raw stored values without the rescale intercept applied. The
    upper percentile is read above air (-900 HU), so a small body in a large
    field of view padded with air still shows its tissue.
    """
    sample = values.ravel()[:: max(1, values.size // 2_000_000)]
    low = np.percentile(sample, 0.5)
    above_air = sample[sample > AIR_CEILING_HU]
    high = np.percentile(above_air if above_air.size else sample, 99.5)
    if low > -500 or high < -200 or high - low < 300:
        raise InputImageError(
            f"the image does not look like a CT in Hounsfield units (0.5-99.5 percentile {low:.0f}..{high:.0f}; "
            "a CT shows air near -1000 HU): is it a mask, an MR, or stored without its rescale intercept?")


# What a fingerprint rounds the geometry to (docs/outputs.md): far finer than any CT voxel, coarser than what
# storing a scan as NIfTI (float32 header) or as DICOM (decimal strings) changes.
FINGERPRINT_SPACING_MM = 0.001
FINGERPRINT_ORIGIN_MM = 0.1
FINGERPRINT_DIRECTION = 0.001


def fingerprint(image: sitk.Image) -> str:
    """SHA-256 of what the scan is: identifies it without naming it, however it is stored.

    The same CT read as NIfTI, as a DICOM folder or as a zip of that folder must have one fingerprint (a
    support set must see that a scan is its own source case), so the fingerprint covers the HU values as
    int16 after rescale (rounded: the stored data type does not count) and the size, with spacing, origin and
    direction taken as float32 and rounded to FINGERPRINT_SPACING_MM, FINGERPRINT_ORIGIN_MM and
    FINGERPRINT_DIRECTION. Take it of the canonical image (`CanonicalCT.image`), so that the same scan stored
    in another orientation has the same fingerprint.
    """
    hu = np.clip(np.rint(sitk.GetArrayViewFromImage(image)), -32768, 32767).astype("<i2")
    digest = hashlib.sha256(np.ascontiguousarray(hu).tobytes())
    digest.update(np.asarray(image.GetSize(), dtype="<i8").tobytes())
    for item, step in ((image.GetSpacing(), FINGERPRINT_SPACING_MM), (image.GetOrigin(), FINGERPRINT_ORIGIN_MM),
                       (image.GetDirection(), FINGERPRINT_DIRECTION)):
        steps = np.rint(np.asarray(item, dtype=np.float32).astype(np.float64) / step).astype("<i8")
        digest.update(steps.tobytes())
    return digest.hexdigest()


def is_axis_aligned(image: sitk.Image, tol: float = 1e-4) -> bool:
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return bool(np.all((direction < tol) | (np.abs(direction - 1) < tol)))


class CanonicalCT:
    """An input volume and its canonical (LPS) view, with the way back.

    Axis-aligned inputs (the usual case) are reoriented by permuting and
    flipping axes only, which is exact and invertible; oblique inputs are
    resampled onto an axis-aligned grid and results are resampled back.
    """

    def __init__(self, image: sitk.Image, interpolator=sitk.sitkLinear):
        """`interpolator` matters only for oblique inputs: nearest neighbour for label maps."""
        self.input = image
        self.input_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        self.oblique = not is_axis_aligned(image)
        if self.oblique:
            self.image = _resample_axis_aligned(image, interpolator)
        else:
            self.image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)

    @property
    def array(self) -> np.ndarray:
        """(z, y, x) view of the canonical image."""
        return sitk.GetArrayViewFromImage(self.image)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(self.image.GetSpacing()[::-1])

    def slice_positions_mm(self) -> np.ndarray:
        """Superior (z) world coordinate of each canonical axial slice."""
        z0, dz = self.image.GetOrigin()[2], self.image.GetSpacing()[2]
        return z0 + dz * np.arange(self.image.GetSize()[2])

    def canonical_like(self, array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(self.image)
        return out

    def to_input_grid(self, array: np.ndarray, interpolator=sitk.sitkNearestNeighbor) -> sitk.Image:
        """Put a canonical (z, y, x) array back on the input's exact grid."""
        canonical = self.canonical_like(array)
        if self.oblique:
            return sitk.Resample(canonical, self.input, sitk.Transform(), interpolator, 0.0, canonical.GetPixelID())
        back = sitk.DICOMOrient(canonical, self.input_orientation)
        back.CopyInformation(self.input)  # identical up to rounding of origin
        return back

    def to_canonical(self, image: sitk.Image, interpolator=sitk.sitkNearestNeighbor) -> np.ndarray:
        """Bring an image on the input's grid (e.g. a mask) into canonical (z, y, x)."""
        if self.oblique:
            image = sitk.Resample(image, self.image, sitk.Transform(), interpolator, 0.0, image.GetPixelID())
        else:
            image = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
        return sitk.GetArrayFromImage(image)


def _resample_axis_aligned(image: sitk.Image, interpolator) -> sitk.Image:
    """Resample an oblique volume onto an LPS grid covering it, keeping its spacing."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size - 1)
    world = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners.astype(float)])
    # spacing along each world axis: that of the input axis most aligned with it
    new_spacing = np.array([spacing[int(np.argmax(np.abs(direction[row])))] for row in range(3)])
    lo, hi = world.min(axis=0), world.max(axis=0)
    new_size = np.ceil((hi - lo) / new_spacing).astype(int) + 1
    reference = sitk.Image([int(s) for s in new_size], image.GetPixelID())
    reference.SetSpacing(new_spacing.tolist())
    reference.SetOrigin(lo.tolist())
    background = float(np.min(sitk.GetArrayViewFromImage(image)))  # air for a CT, 0 for a label map
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, background, image.GetPixelID())


def write_image(image: sitk.Image, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
