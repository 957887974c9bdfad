"""A corpus of bad CT inputs, each with the words its error message must contain.

Shared by the CLI, pipeline and server tests, so every entry point refuses
the same things the same way.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from autocontour.phantom import make_phantom


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected words in the error message)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = make_phantom(5, size=(48, 40, 16), spacing=(8.0, 8.0, 6.0)).ct
    good_path = _write(good, folder / "good.nii.gz")
    data = good_path.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    empty = folder / "empty.nii.gz"
    empty.write_bytes(b"")
    cases["empty file"] = (empty, "empty")

    junk = folder / "junk.nii.gz"
    junk.write_bytes(b"this is not an image " * 50)
    cases["not a NIfTI"] = (junk, "not a NIfTI")

    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated gzip"] = (truncated, "truncated")

    raw = gzip.decompress(data)
    short_nii = folder / "short.nii"
    short_nii.write_bytes(raw[: len(raw) - 1000])
    cases["truncated nii"] = (short_nii, "truncated")

    cases["2D image"] = (_write(good[:, :, 5], folder / "slice.nii.gz"), "2D")
    cases["4D image"] = (_write(sitk.JoinSeries([good, good]), folder / "series.nii.gz"), "4D")

    arr = sitk.GetArrayFromImage(good)
    arr[3, 10, 10] = np.nan
    nan = sitk.GetImageFromArray(arr)
    nan.CopyInformation(good)
    cases["NaN values"] = (_write(nan, folder / "nan.nii.gz"), "NaN")

    absurd = sitk.Image(good)
    absurd.SetSpacing((8.0, 8.0, 500.0))
    cases["absurd spacing"] = (_write(absurd, folder / "absurd.nii.gz"), "spacing")

    zero = sitk.Image(good)
    zero.SetSpacing((0.0001, 8.0, 6.0))
    cases["zero spacing"] = (_write(zero, folder / "zero_spacing.nii.gz"), "spacing")

    label_map = sitk.Cast(good > 0, sitk.sitkUInt8)
    cases["label map, not CT"] = (_write(label_map, folder / "mask.nii.gz"), "does not look like a CT")

    scaled = sitk.RescaleIntensity(good, 0, 1)
    cases["scaled to 0..1"] = (_write(scaled, folder / "scaled.nii.gz"), "does not look like a CT")

    few = good[:, :, :2]
    cases["two slices"] = (_write(few, folder / "two.nii.gz"), "axial slice")

    text = folder / "notes.txt"
    text.write_text("hello")
    cases["wrong extension"] = (text, ".nii")

    def edited(name: str, **fields) -> Path:
        """The good CT with header fields overwritten as stored (offsets of the NIfTI-1 header)."""
        offsets = {"dim": (40, "<i2"), "datatype": (70, "<i2"), "bitpix": (72, "<i2"), "pixdim": (76, "<f4"),
                   "vox_offset": (108, "<f4"), "qform_code": (252, "<i2"), "sform_code": (254, "<i2"),
                   "srow_x": (280, "<f4"), "magic": (344, "S4"), "extension": (348, "S4")}
        header = bytearray(raw[:352])
        for field_name, value in fields.items():
            offset, dtype = offsets[field_name]
            encoded = np.asarray(value, dtype=dtype).tobytes()
            header[offset:offset + len(encoded)] = encoded
        path = folder / name
        path.write_bytes(gzip.compress(bytes(header) + raw[352:]))
        return path

    def with_extension(name: str, esize: int) -> Path:
        """The good CT with one 16-byte header extension whose size field says `esize`."""
        header = bytearray(raw[:352])
        header[108:112] = np.float32(368).tobytes()  # vox_offset: after the header and the extension
        header[348:352] = b"\x01\0\0\0"
        extension = np.array([esize, 6], dtype="<i4").tobytes() + b"comment\0"  # ecode 6: a comment
        path = folder / name
        path.write_bytes(gzip.compress(bytes(header) + extension + raw[352:]))
        return path

    dim = np.frombuffer(raw[40:56], dtype="<i2").copy()
    for magic, words in ((b"xxxx", "magic string is b'xxxx', not the 'n+1'"), (b"\0\0\0\0", "Analyze"),
                         (b"ni1\0", "two-file (.hdr/.img)"), (b"n+2\0", "magic string is b'n+2\\x00'")):
        cases[f"magic {magic!r}"] = (edited(f"magic_{magic[:3].hex()}.nii.gz", magic=magic), words)
    for ndim in (9, 0):
        cases[f"dim[0] = {ndim}"] = (edited(f"dim0_{ndim}.nii.gz", dim=[ndim, *dim[1:]]),
                                     f"dim[0] (the number of dimensions) is {ndim}")
    cases["negative dimension"] = (edited("dim_negative.nii.gz", dim=[3, dim[1], -40, *dim[3:]]),
                                   "zero or negative dimension: (48, -40, 16)")
    cases["300 MB header extension"] = (with_extension("extension_300mb.nii.gz", 300_000_016),
                                        "header extension at byte 352 claims 300,000,016 bytes")
    cases["8-byte header extension"] = (with_extension("extension_8.nii.gz", 8), "an extension takes at least 16")
    cases["vox_offset inside the header"] = (edited("vox_offset_0.nii.gz", vox_offset=0), "inside the header")
    vox_offset = edited("vox_offset_300mb.nii.gz", vox_offset=300e6)
    uncompressed = vox_offset.with_name("vox_offset_300mb.nii")
    uncompressed.write_bytes(gzip.decompress(vox_offset.read_bytes()))
    cases["vox_offset 300 MB"] = (uncompressed, "from byte 300,000,000, its vox_offset")
    cases["complex voxels"] = (edited("complex.nii.gz", datatype=32, bitpix=64), "complex")

    pixdim = np.frombuffer(raw[76:108], dtype="<f4").copy()
    no_spacing = pixdim.copy()
    no_spacing[1:4] = 0
    cases["zero pixdim, no qform or sform"] = (edited("pixdim0.nii.gz", pixdim=no_spacing, qform_code=0,
                                                      sform_code=0), "pixdim[1]")
    nan_spacing = pixdim.copy()
    nan_spacing[3] = np.nan
    cases["NaN pixdim"] = (edited("pixdim_nan.nii.gz", pixdim=nan_spacing), "pixdim[3]")
    negative_spacing = pixdim.copy()
    negative_spacing[2] = -8
    cases["negative pixdim"] = (edited("pixdim_negative.nii.gz", pixdim=negative_spacing), "pixdim[2]")
    cases["no qform or sform"] = (edited("no_xform.nii.gz", qform_code=0, sform_code=0), "neither a qform nor")
    cases["singular sform"] = (edited("sform0.nii.gz", sform_code=1, srow_x=[0, 0, 0, 0]), "sform")
    one_mm = pixdim.copy()
    one_mm[1] = 1.0  # what nibabel writes for a zero pixdim, beside an sform of 8 mm voxels
    cases["pixdim disagrees with the sform"] = (edited("pixdim_vs_sform.nii.gz", pixdim=one_mm, sform_code=1),
                                                "pixdim says 1 x 8 x 6 mm, the sform 8 x 8 x 6")
    shifted = np.frombuffer(raw[280:296], dtype="<f4").copy()
    shifted[3] += 50
    cases["qform and sform 50 mm apart"] = (edited("qform_vs_sform.nii.gz", qform_code=1, sform_code=1,
                                                   srow_x=shifted), "qform and sform place the scan up to 50")

    not_zip = folder / "fake.zip"
    not_zip.write_bytes(b"PK\x03\x04" + b"not really a zip " * 40)
    cases["zip magic, not a zip"] = (not_zip, "not a readable zip")

    huge_header = bytearray(raw[:352])
    dims = np.frombuffer(bytes(huge_header[40:56]), dtype="<i2").copy()
    dims[1:4] = [30000, 30000, 3000]
    huge_header[40:56] = dims.tobytes()
    huge = folder / "huge.nii.gz"
    huge.write_bytes(gzip.compress(bytes(huge_header) + raw[352:352 + 4096]))
    cases["gzip bomb header"] = (huge, "voxels")
    return cases


def accepted_inputs(folder: Path) -> tuple[Path, dict[str, Path]]:
    """A phantom CT as NIfTI-1 (little-endian, as most writers store it), and the same CT stored as the other
    forms a reader must read as the very same image: name -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _write(make_phantom(5, size=(48, 40, 16), spacing=(8.0, 8.0, 6.0)).ct, folder / "good.nii.gz")
    image = nib.load(good)
    voxels, affine = np.asanyarray(image.dataobj), image.affine
    forms: dict[str, Path] = {}
    for suffix in (".nii.gz", ".nii"):
        forms[f"NIfTI-2 {suffix}"] = folder / f"nifti2{suffix}"
        nib.save(nib.Nifti2Image(voxels, affine), forms[f"NIfTI-2 {suffix}"])
    big_endian = nib.Nifti1Header(endianness=">")
    forms["big-endian NIfTI-1"] = folder / "big_endian.nii.gz"
    nib.save(nib.Nifti1Image(voxels, affine, big_endian), forms["big-endian NIfTI-1"])
    commented = nib.Nifti1Image(voxels, affine)
    commented.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"an honest header extension"))
    forms["NIfTI-1 with a header extension"] = folder / "extension.nii.gz"
    nib.save(commented, forms["NIfTI-1 with a header extension"])
    return good, forms
