"""The registration prior (autocontour/support/registration.py) and virtual patients (autocontour/training/virtual.py).

Phantoms only (a few 4 mm volumes), so these run in seconds without the shared data.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.phantom import make_phantom
from autocontour.support.registration import (
    AIR_HU,
    MASK_SCALE,
    AtlasCase,
    _bspline_domain,
    make_atlas_case,
    make_atlas_ct,
    register,
    registration_prior,
    to_grid,
)
from autocontour.training.virtual import smooth_deformation, virtual_patient

# organs with an edge the metric can see; the phantom's iliopsoas is a low-contrast tube in muscle-like tissue
STRUCTURES = ("urinary_bladder", "sacrum", "hip_left", "hip_right")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def deformed_copy(ct: sitk.Image, labels: sitk.Image, shift_mm, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """The phantom bent smoothly (about 5 mm per control point) and shifted by `shift_mm`: a known truth."""
    bend = smooth_deformation(ct, 5.0, np.random.default_rng(seed))
    to_source = sitk.CompositeTransform(3)
    to_source.AddTransform(sitk.TranslationTransform(3, [-s for s in shift_mm]))
    to_source.AddTransform(bend)
    moved_ct = sitk.Resample(ct, ct, to_source, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    moved_labels = sitk.Resample(labels, labels, to_source, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return moved_ct, moved_labels


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=3)


def test_phantom_registered_to_a_deformed_shifted_copy_recovers_the_mask(phantom):
    query_ct, query_labels = deformed_copy(phantom.ct, phantom.labels, (12.0, -8.0, 16.0), seed=7)
    source_labels = sitk.GetArrayViewFromImage(phantom.labels)
    truth = sitk.GetArrayViewFromImage(query_labels)
    atlas_ct = make_atlas_ct(phantom.ct)
    registration = register(atlas_ct, make_atlas_ct(query_ct))
    for name in STRUCTURES:
        value = phantom.names[name]
        case = make_atlas_case(phantom.ct, source_labels == value)
        warped = sitk.GetArrayFromImage(to_grid(registration.warp(case.mask), query_ct)) >= 0.5
        score = dice(warped, truth == value)
        print(f"{name}: Dice {score:.3f}")
        assert score >= 0.9, name
    unregistered = dice(source_labels == phantom.names["urinary_bladder"], truth == phantom.names["urinary_bladder"])
    assert unregistered < 0.8  # the shift alone would fail the test: the registration did the work
    assert registration.diagnostics["seconds"] < 60
    assert {"metric", "affine_metric", "bspline_metric", "axial_shift_mm"} <= registration.diagnostics.keys()


def test_registration_prior_finds_the_level_when_the_fields_of_view_differ(phantom):
    """The query shows only the upper 60 % of the source: the axial search, not the centres, places it."""
    array = sitk.GetArrayViewFromImage(phantom.labels)
    z_cut = int(array.shape[0] * 0.4)
    query_ct = phantom.ct[:, :, z_cut:]
    case = make_atlas_case(phantom.ct, array == phantom.names["sacrum"])
    probability, registration = registration_prior(case, query_ct, reference=query_ct)
    warped = sitk.GetArrayFromImage(probability) >= 0.5
    assert dice(warped, array[z_cut:] == phantom.names["sacrum"]) >= 0.85
    assert abs(registration.diagnostics["axial_shift_mm"]) < 8.0


def test_atlas_case_is_small_compressed_and_round_trips(tmp_path):
    phantom = make_phantom(seed=3, size=(192, 160, 80), spacing=(2.0, 2.0, 2.0))
    mask = sitk.GetArrayViewFromImage(phantom.labels) == phantom.names["urinary_bladder"]
    case = make_atlas_case(phantom.ct, mask, spacing_mm=4.0)
    assert case.ct.GetPixelID() == sitk.sitkInt16 and case.mask.GetPixelID() == sitk.sitkUInt8
    assert case.ct.GetSpacing() == pytest.approx((4.0, 4.0, 4.0))
    size = case.save(tmp_path / "atlas")
    assert size < phantom.ct.GetNumberOfPixels() * 4 / 20  # float32 at 2 mm: 9.8 MB
    loaded = AtlasCase.load(tmp_path / "atlas")
    for before, after in ((case.ct, loaded.ct), (case.mask, loaded.mask)):
        assert np.array_equal(sitk.GetArrayViewFromImage(before), sitk.GetArrayViewFromImage(after))
        assert after.GetOrigin() == pytest.approx(before.GetOrigin())
        assert after.GetSpacing() == pytest.approx(before.GetSpacing())
    # occupancy keeps the volume a 4 mm nearest-neighbour copy would round to whole voxels
    volume_mm3 = mask.sum() * np.prod(phantom.ct.GetSpacing())
    occupancy_mm3 = sitk.GetArrayViewFromImage(case.mask).sum() / MASK_SCALE * 4.0 ** 3
    assert occupancy_mm3 == pytest.approx(volume_mm3, rel=0.05)


def test_atlas_ct_removes_the_reconstruction_circle_and_the_couch(phantom):
    ct = sitk.GetArrayFromImage(phantom.ct)
    ct[:, :4, :] = -2048  # a rim outside the reconstruction circle
    ct[:, -6:-3, 10:-10] = 200  # a couch below the patient, not touching it
    image = sitk.GetImageFromArray(ct)
    image.CopyInformation(phantom.ct)
    small = sitk.GetArrayFromImage(make_atlas_ct(image))  # a copy: a view would outlive its image
    assert small.min() >= -1000
    assert (small[:, -2:, :] == -1000).all()


def test_virtual_patient_is_reproducible_and_its_labels_follow_the_anatomy(phantom):
    kwargs = dict(spacing_mm=(4.0, 4.0, 4.0), fov="pelvis")
    first = virtual_patient(phantom.ct, phantom.labels, phantom.names, seed=5, **kwargs)
    again = virtual_patient(phantom.ct, phantom.labels, phantom.names, seed=5, **kwargs)
    other = virtual_patient(phantom.ct, phantom.labels, phantom.names, seed=6, **kwargs)
    assert np.array_equal(sitk.GetArrayViewFromImage(first.ct), sitk.GetArrayViewFromImage(again.ct))
    assert first.parameters == again.parameters != other.parameters
    hu = sitk.GetArrayViewFromImage(first.ct)
    labels = sitk.GetArrayViewFromImage(first.labels)
    assert hu.min() == -2048  # the reconstruction circle
    assert first.ct.GetSize()[2] < phantom.ct.GetSize()[2]  # pelvis-only field of view
    iliac = np.isin(labels, [phantom.names["iliac_artery_left"], phantom.names["iliac_artery_right"]])
    assert iliac.any() and "iliac_artery_left" in first.parameters["enhancement_hu"]
    bone = labels == phantom.names["hip_left"]
    assert np.median(hu[bone]) > 250  # bone labels still sit on bone after the deformation


def test_a_query_too_short_to_place_is_not_reliable(phantom):
    """Ten 4 mm slices (40 mm) resemble many levels of a longer scan: the prior must not be trusted."""
    short = phantom.ct[:, :, 15:25]
    registration = register(make_atlas_ct(phantom.ct), make_atlas_ct(short))
    assert not registration.reliable and registration.diagnostics["reliable"] is False
    assert register(make_atlas_ct(phantom.ct), make_atlas_ct(phantom.ct[:, :, 5:])).reliable


def test_the_metric_samples_the_query_to_its_own_ends_but_stops_short_of_the_source_edge(phantom):
    """A pelvis scan inside a longer source: its end slices are sampled (the IVC at its top needs them);
    where the source scan ends inside the query, the slices near that edge are not (the source has no data)."""
    from autocontour.support.registration import OVERLAP_MARGIN_MM, _fixed_mask, _z_positions

    query = make_atlas_ct(phantom.ct)
    z = _z_positions(query)
    body_slices = np.nonzero(sitk.GetArrayFromImage(_fixed_mask(query, (z[0], z[-1]))).any(axis=(1, 2)))[0]
    assert body_slices[0] == 0 and body_slices[-1] == z.size - 1
    source_ends = (z[0] + 40.0, z[-1] - 40.0)
    sampled = z[sitk.GetArrayFromImage(_fixed_mask(query, source_ends)).any(axis=(1, 2))]
    assert sampled[0] >= source_ends[0] + OVERLAP_MARGIN_MM and sampled[-1] <= source_ends[1] - OVERLAP_MARGIN_MM


def test_a_registration_sampled_on_a_grid_warps_every_mask_as_the_transform_does(phantom):
    """`sampled_on` stores the displacement once per model grid; the masks it warps are the transform's own."""
    query_ct, _ = deformed_copy(phantom.ct, phantom.labels, (8.0, -4.0, 12.0), seed=5)
    registration = register(make_atlas_ct(phantom.ct), make_atlas_ct(query_ct))
    (nx, ny, nz), (sx, sy, sz) = query_ct.GetSize(), query_ct.GetSpacing()
    grid = sitk.Image([96, 80, nz], sitk.sitkUInt8)  # a model grid: coarser in-plane, the scan's slices
    grid.SetSpacing([sx * nx / 96, sy * ny / 80, sz])
    grid.SetOrigin(query_ct.GetOrigin())
    sampled = registration.sampled_on(grid)
    labels = sitk.GetArrayViewFromImage(phantom.labels)
    for name in ("urinary_bladder", "sacrum"):
        mask = make_atlas_case(phantom.ct, labels == phantom.names[name]).mask
        direct = sitk.GetArrayFromImage(registration.warp(mask, grid))
        assert direct.max() > 0.5, name
        np.testing.assert_allclose(sitk.GetArrayFromImage(sampled.warp(mask, grid)), direct, atol=1e-5)
    assert sampled.reliable == registration.reliable


def test_the_deformation_is_modelled_over_the_body_not_the_air_around_it(phantom):
    """A scan padded with air (as the OpenKBP grids are) gets the same B-spline domain as the bare scan."""
    atlas = make_atlas_ct(phantom.ct)
    padded = sitk.ConstantPad(atlas, [20, 20, 0], [20, 20, 0], AIR_HU)
    bare, wide = _bspline_domain(atlas), _bspline_domain(padded)
    assert wide.GetSize() == bare.GetSize() and wide.GetSize()[0] <= atlas.GetSize()[0]
    np.testing.assert_allclose(wide.GetOrigin(), bare.GetOrigin())
    body = np.argwhere(sitk.GetArrayViewFromImage(padded) > AIR_HU)
    for corner in (body.min(axis=0), body.max(axis=0)):  # the body's extremes lie inside the domain
        point = padded.TransformIndexToPhysicalPoint([int(i) for i in corner[::-1]])
        index = wide.TransformPhysicalPointToIndex(point)
        assert all(0 <= i < n for i, n in zip(index, wide.GetSize(), strict=True))
