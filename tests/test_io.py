"""Reading CTs: every bad input gets a clear error; orientation round trips exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from badinputs import accepted_inputs, bad_inputs
from conftest import DATA, EXAMPLE_CT

from autocontour.config import Settings
from autocontour.dicom.reading import read_input
from autocontour.errors import InputImageError
from autocontour.io import CanonicalCT, check_looks_like_ct, read_ct, read_image
from autocontour.phantom import make_phantom


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_inputs(tmp_path_factory.mktemp("bad"))


def test_every_bad_input_is_named(corpus):
    for name, (path, words) in corpus.items():
        with pytest.raises(InputImageError) as err:
            read_input(path, Settings(max_voxels=50_000_000))
        assert words.lower() in str(err.value).lower(), f"{name}: {err.value}"
        assert "\n" not in str(err.value)


def _same_image(a: sitk.Image, b: sitk.Image) -> bool:
    return (np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
            and all(np.allclose(x, y, atol=1e-4) for x, y in ((a.GetSpacing(), b.GetSpacing()),
                                                               (a.GetOrigin(), b.GetOrigin()),
                                                               (a.GetDirection(), b.GetDirection()))))


def test_nifti2_big_endian_and_header_extensions_read_as_the_same_image(tmp_path):
    good, forms = accepted_inputs(tmp_path)
    reference = read_ct(good)
    for name, path in forms.items():
        assert _same_image(read_ct(path), reference), name


def test_an_oblique_nifti2_is_placed_as_its_nifti1_twin(tmp_path):
    """NIfTI-2's geometry comes from nibabel's affine (ITK cannot read NIfTI-2), NIfTI-1's from ITK: a rotated,
    flipped, shifted grid must come out the same from both."""
    angle = np.radians(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-2.0, 3.0, 5.0])  # x flipped, anisotropic voxels
    affine[:3, 3] = [120.0, -80.5, 33.25]
    voxels = sitk.GetArrayFromImage(make_phantom(2, size=(40, 32, 12), spacing=(8, 8, 8)).ct).T.astype(np.int16)
    twins = {}
    for version, image_class in ((1, nib.Nifti1Image), (2, nib.Nifti2Image)):
        image = image_class(voxels, affine)
        image.set_qform(affine, code=1)
        twins[version] = tmp_path / f"oblique{version}.nii.gz"
        nib.save(image, twins[version])
    one, two = read_image(twins[1]), read_image(twins[2])
    assert _same_image(one, two)
    assert np.allclose(two.GetSpacing(), (2, 3, 5)) and np.allclose(two.GetOrigin(), (-120, 80.5, 33.25))


def test_good_phantom_reads(tmp_path):
    phantom = make_phantom(1, size=(40, 32, 12), spacing=(8, 8, 8))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom.ct, str(path))
    ct = read_ct(path)
    assert ct.GetPixelID() == sitk.sitkFloat32 and ct.GetSize() == (40, 32, 12)


def test_example_ct_is_ras_and_canonical_is_lps():
    ct = CanonicalCT(read_ct(EXAMPLE_CT))
    assert ct.input_orientation == "RAS"
    assert np.allclose(ct.image.GetDirection(), np.eye(3).ravel())
    z = ct.slice_positions_mm()
    assert np.all(np.diff(z) > 0)  # slice 0 is the most inferior


@pytest.mark.parametrize("code", ["LPS", "RAS", "RAI", "PIL", "SAR"])
def test_canonical_round_trip_is_exact(code):
    phantom = make_phantom(2, size=(36, 30, 20), spacing=(7.0, 6.0, 5.0), orientation=code)
    ct = CanonicalCT(phantom.ct)
    labels = ct.to_canonical(phantom.labels)
    back = ct.to_input_grid(labels)
    assert back.GetSize() == phantom.labels.GetSize()
    assert back.GetOrigin() == phantom.labels.GetOrigin() and back.GetDirection() == phantom.labels.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(phantom.labels))


def test_same_patient_in_two_orientations_gives_the_same_canonical_volume():
    a = CanonicalCT(make_phantom(3, size=(40, 36, 20), spacing=(6, 6, 5), orientation="LPS", noise_hu=0).ct)
    b = CanonicalCT(make_phantom(3, size=(40, 36, 20), spacing=(6, 6, 5), orientation="RAS", noise_hu=0).ct)
    assert np.allclose(a.image.GetOrigin(), b.image.GetOrigin(), atol=1e-4)
    assert np.allclose(a.array, b.array, atol=1e-3)


def test_oblique_input_is_resampled_and_mapped_back():
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    phantom = make_phantom(4, size=(40, 36, 16), spacing=(6, 6, 6), direction=rotation)
    ct = CanonicalCT(phantom.ct)
    assert ct.oblique and np.allclose(ct.image.GetDirection(), np.eye(3).ravel())
    labels = ct.to_canonical(phantom.labels)
    back = sitk.GetArrayFromImage(ct.to_input_grid(labels))
    original = sitk.GetArrayFromImage(phantom.labels)
    assert (back == original).mean() > 0.97


def test_hu_check_accepts_real_ct_and_refuses_mri_like_values():
    ct = read_ct(EXAMPLE_CT)
    check_looks_like_ct(sitk.GetArrayFromImage(ct))
    with pytest.raises(InputImageError):
        check_looks_like_ct(np.random.default_rng(0).uniform(0, 800, (10, 10, 10)))


def test_hu_check_accepts_a_small_body_in_a_field_of_view_padded_with_air():
    """Like an OpenKBP planning CT whose body fills 0.4 % of its 128 x 128 x 128 grid: the 99.5th percentile of
    the whole volume is air, yet the scan is a CT."""
    volume = np.random.default_rng(1).integers(-1024, -950, (64, 128, 128)).astype(np.int16)  # noisy air
    volume[20:50, 60:66, 60:66] = np.random.default_rng(0).integers(-100, 80, (30, 6, 6))  # soft tissue and fat
    volume[20:50, 62:64, 62:64] = 700  # bone
    assert np.percentile(volume, 99.5) < -900  # what the check once read as "no tissue"
    check_looks_like_ct(volume)


def test_voxels_are_decoded_as_the_smallest_type_with_simpleitk_geometry_and_values(tmp_path):
    """Our decoder (streamed, smallest type) reads every file exactly as SimpleITK does, values and grid."""
    phantom = make_phantom(3, size=(40, 32, 12), spacing=(8, 8, 8)).ct
    scaled = tmp_path / "scaled.nii.gz"  # int16 with scl_inter -1024, the way scanners store CTs
    values = sitk.GetArrayFromImage(phantom).astype(np.int16) + 1024
    nib.save(nib.Nifti1Image(np.ascontiguousarray(values.transpose(2, 1, 0)), np.diag([-8.0, -8.0, 8.0, 1.0]),
                             dtype=np.int16), str(scaled))
    header_fixed = nib.load(str(scaled))
    header_fixed.header.set_slope_inter(1.0, -1024.0)
    nib.save(header_fixed, str(scaled))
    float64 = tmp_path / "float64.nii"  # the phantom's values are fractional: float32 holds them
    sitk.WriteImage(sitk.Cast(phantom, sitk.sitkFloat64), str(float64))
    whole64 = tmp_path / "whole64.nii.gz"
    sitk.WriteImage(sitk.Round(sitk.Cast(phantom, sitk.sitkFloat64)), str(whole64))
    files = [EXAMPLE_CT, scaled, float64, whole64, *sorted((DATA / "metrics").glob("*/*.nii.gz"))[:4]]
    for path in files:
        ours, theirs = read_image(path), sitk.ReadImage(str(path))
        if theirs.GetDimension() == 4:
            theirs = theirs[:, :, :, 0]
        assert ours.GetSize() == theirs.GetSize() and ours.GetOrigin() == theirs.GetOrigin(), path
        assert ours.GetSpacing() == theirs.GetSpacing() and ours.GetDirection() == theirs.GetDirection(), path
        assert np.array_equal(sitk.GetArrayViewFromImage(ours).astype(np.float64),
                              sitk.GetArrayViewFromImage(theirs).astype(np.float64)), path
    assert read_image(EXAMPLE_CT).GetPixelID() == sitk.sitkInt16  # stored as int32, holds HU
    assert read_image(float64).GetPixelID() == sitk.sitkFloat32
    assert read_image(whole64).GetPixelID() == sitk.sitkInt16  # whole numbers stored as float64
    assert read_image(scaled).GetPixelID() == sitk.sitkInt16
