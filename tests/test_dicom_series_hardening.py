"""Issue 34: a DICOM CT series never decodes to silently wrong values, and every refusal names its real problem.

Each input is the shipped 20-slice series with headers edited by pydicom (and pixel data re-encoded where a
rescale changes, so that the decoded Hounsfield units stay the same)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DATA
from dicom_tools import assert_segment_refuses
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSNearLossless

from autocontour.dicom.series import ENHANCED_CT, read_series
from autocontour.errors import InputImageError

SERIES = DATA / "dicom_ct"
Edit = Callable[[int, pydicom.Dataset], None]


def _sorted_slices() -> list[Path]:
    return sorted(SERIES.glob("CT.*"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                           .ImagePositionPatient[2]))


def _series(folder: Path, edit: Edit, only: Callable[[int], bool] = lambda i: True) -> Path:
    """A copy of the shipped series (slices numbered inferior to superior) with `edit(index, ds)` applied to
    the slices `only` picks."""
    folder.mkdir(parents=True)
    for i, path in enumerate(_sorted_slices()):
        ds = pydicom.dcmread(path)
        if only(i):
            edit(i, ds)
        ds.save_as(folder / f"{i:03d}.dcm")
    return folder


def _native(ds: pydicom.Dataset, stored: np.ndarray) -> None:
    """Store `stored` as the slice's pixels, uncompressed (16 bits, signed or not as its dtype says)."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    ds.PixelData = stored.tobytes()


def _rescaled(slope: float, intercept: float, signed: bool) -> Edit:
    """Re-encode a slice under another rescale, keeping its Hounsfield units exactly."""
    def edit(_: int, ds: pydicom.Dataset) -> None:
        hu = ds.pixel_array.astype(np.int64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        stored = (hu - intercept) / slope
        assert np.array_equal(stored, np.round(stored))
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        _native(ds, stored.astype(np.int16 if signed else np.uint16))
    return edit


def _hu(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_series(path).image)


@pytest.fixture(scope="module")
def reference_hu() -> np.ndarray:
    return _hu(SERIES)


@pytest.mark.parametrize("variants", [
    [(1, -1024, False), (1, -3072, False)],  # intercepts 2,048 HU apart
    [(0.5, -1024, False), (1, -1024, False)],  # a fractional slope first
    [(1, 0, True), (0.25, -2048, False)],  # signed identity beside a slope of 0.25
])
def test_each_slice_is_decoded_with_its_own_rescale(tmp_path, reference_hu, variants):
    edits = [_rescaled(*v) for v in variants]
    folder = _series(tmp_path / "ct", lambda i, ds: edits[(i // 5) % 2](i, ds))
    series = read_series(folder)
    hu = sitk.GetArrayFromImage(series.image)
    assert hu.dtype == reference_hu.dtype and np.array_equal(hu, reference_hu)
    assert series.image.GetSpacing() == read_series(SERIES).image.GetSpacing()
    assert series.image.GetOrigin() == read_series(SERIES).image.GetOrigin()


def _pixel_spacing(_: int, ds: pydicom.Dataset) -> None:
    ds.PixelSpacing = [0.7, 0.7]


def _slope_zero(_: int, ds: pydicom.Dataset) -> None:
    ds.RescaleSlope = 0


def _half_pixel_data(_: int, ds: pydicom.Dataset) -> None:
    _native(ds, ds.pixel_array.astype(np.uint16))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


def _tilt(_: int, ds: pydicom.Dataset) -> None:
    angle = np.radians(1)
    ds.ImageOrientationPatient = [1, 0, 0, 0, round(np.cos(angle), 8), round(-np.sin(angle), 8)]


def _shear(i: int, ds: pydicom.Dataset) -> None:
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [round(position[0] + 0.05 * i, 4), *position[1:]]


def _shift(_: int, ds: pydicom.Dataset) -> None:
    position = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [position[0] + 5, *position[1:]]


def _non_unit(_: int, ds: pydicom.Dataset) -> None:
    ds.ImageOrientationPatient = [2, 0, 0, 0, 1, 0]


def _no_orientation(_: int, ds: pydicom.Dataset) -> None:
    del ds.ImageOrientationPatient


def _no_position(_: int, ds: pydicom.Dataset) -> None:
    del ds.ImagePositionPatient


REFUSED: dict[str, tuple[Edit, Callable[[int], bool], str]] = {
    "pixel spacing differs": (_pixel_spacing, lambda i: i % 2 == 1,
                              "different pixel spacings: 0.976562 x 0.976562 mm in"),
    "rescale slope 0": (_slope_zero, lambda i: i == 7, "RescaleSlope is 0 in 1 slice(s) (e.g. 007.dcm (instance"),
    "half the pixel data": (_half_pixel_data, lambda i: i == 4,
                            "the PixelData of slice 004.dcm (instance 282) holds 262,144 bytes, fewer than the "
                            "524,288 its Rows x Columns x BitsAllocated/8 need: a truncated slice"),
    "gantry tilt": (_tilt, lambda i: True, "the slices drift in-plane by up to 0.66 mm along the stack: a "
                    "gantry-tilted or sheared series; reconstruct it without tilt"),
    "shear": (_shear, lambda i: True, "the slices drift in-plane by up to 0.95 mm along the stack: a "
              "gantry-tilted or sheared series; reconstruct it without tilt"),
    "in-plane shift": (_shift, lambda i: i == 9, "the slices are shifted in-plane by up to 5.00 mm from one "
                       "another (e.g. the slice at -786.50 mm along the normal): they do not form one straight stack"),
    "non-unit orientation": (_non_unit, lambda i: True, "ImageOrientationPatient of slice 000.dcm (instance 286) is "
                             "not two unit vectors at right angles: 2, 0, 0, 0, 1, 0"),
    "no orientation": (_no_orientation, lambda i: i == 3, "slice 003.dcm (instance 283) has no "
                       "ImageOrientationPatient"),
    "no position": (_no_position, lambda i: i == 12, "slice 012.dcm (instance 274) has no ImagePositionPatient"),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("refused")
    return {name: (_series(root / name.replace(" ", "_"), edit, only), words)
            for name, (edit, only, words) in REFUSED.items()}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refusals_name_their_problem(refused, name):
    folder, words = refused[name]
    with pytest.raises(InputImageError) as caught:
        read_series(folder)
    assert words in str(caught.value)
    assert "geometry is inconsistent" not in str(caught.value) and "a slice may be missing" not in str(caught.value)


def test_enhanced_ct_is_named(tmp_path):
    folder = tmp_path / "enhanced"
    folder.mkdir()
    ds = pydicom.dcmread(_sorted_slices()[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.NumberOfFrames = 1
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):  # in the functional groups there
        delattr(ds, keyword)
    ds.save_as(folder / "enhanced.dcm")
    with pytest.raises(InputImageError, match=r"enhanced \(multi-frame\) CT is not supported; export classic CT"):
        read_series(folder)


def test_cli_refuses_each_with_exit_2_and_one_line(refused, tmp_path, capsys, small_weights):
    assert_segment_refuses(refused, tmp_path / "out", small_weights, capsys)


def test_lossy_pixels_are_decoded_with_a_warning(tmp_path, reference_hu):
    def near_lossless(_: int, ds: pydicom.Dataset) -> None:
        ds.decompress()
        ds.compress(JPEGLSNearLossless, jls_error=2, encoding_plugin="pyjpegls")
    series = read_series(_series(tmp_path / "jpegls", near_lossless))
    assert np.abs(sitk.GetArrayFromImage(series.image).astype(int) - reference_hu).max() <= 2
    assert any("lossy-compressed (transfer syntax JPEG-LS Lossy (Near-Lossless) Image Compression)" in w
               for w in series.warnings), series.warnings

    def flagged(_: int, ds: pydicom.Dataset) -> None:
        ds.LossyImageCompression = "01"
    series = read_series(_series(tmp_path / "flagged", flagged, lambda i: i == 0))
    assert np.array_equal(sitk.GetArrayFromImage(series.image), reference_hu)
    assert any('lossy-compressed (LossyImageCompression "01")' in w for w in series.warnings), series.warnings
    assert not any("lossy" in w for w in read_series(SERIES).warnings)


def _same_meta_uid(_: int, ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = ""  # blanked by an anonymiser, and the file meta's is the same on every slice
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"


def _duplicate_uids(i: int, ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i // 2}"  # two slices per UID


@pytest.mark.parametrize("edit, distinct", [(_same_meta_uid, 1), (_duplicate_uids, 10)])
def test_non_unique_sop_instance_uids_are_replaced(tmp_path, edit, distinct):
    series = read_series(_series(tmp_path / "ct", edit))
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    assert len(set(uids)) == 20
    assert any(f"SOP Instance UIDs are not unique ({distinct} distinct for 20 slices); deterministic UIDs derived "
               "from its contents were assigned" in w for w in series.warnings), series.warnings
    assert [str(ds.SOPInstanceUID) for ds in read_series(tmp_path / "ct").datasets] == uids  # deterministic
