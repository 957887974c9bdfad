"""Bone profiles bound where along z a structure is searched."""

from __future__ import annotations

import numpy as np
from conftest import EXAMPLE_CT, ROOT

from autocontour.io import CanonicalCT, read_ct
from autocontour.options import SegmentOptions
from autocontour.support import discover
from autocontour.support.localise import Profile, bone_profile, localise, match


def _profile(ct: CanonicalCT) -> Profile:
    return bone_profile(ct.array, ct.spacing_zyx, ct.slice_positions_mm())


def test_a_cropped_scan_matches_and_the_window_covers_the_bladder():
    full = CanonicalCT(read_ct(EXAMPLE_CT))
    cropped = CanonicalCT(full.image[:, :, 5:80])  # another scan range of the same patient
    source = discover([ROOT / "support_sets"])["bladder"].manifest.source_cases[0]
    found = match(Profile.from_dict(source.bone_profile), _profile(cropped))
    assert found.score > 0.95 and abs(found.scale - 1) < 0.03 and abs(found.shift_mm) < 6
    z = cropped.slice_positions_mm()
    located = localise([(Profile.from_dict(source.bone_profile), tuple(source.extent_mm))], _profile(cropped),
                     (z[0], z[-1]))
    assert located.verdict == "window"
    lo, hi = located.window_mm
    assert lo <= source.extent_mm[0] and hi >= source.extent_mm[1]
    assert hi < full.slice_positions_mm()[-1] - 100  # the upper abdomen is not searched for a bladder


def test_a_scan_without_matching_skeleton_gives_no_window():
    flat = Profile(0.0, tuple(np.random.default_rng(0).random(80)))
    source = Profile(0.0, tuple(float(v) for v in np.sin(np.linspace(0, 6, 60)) * 100 + 200))
    located = localise([(source, (30.0, 60.0))], flat, (0.0, 240.0))
    assert located.verdict == "whole_body" and located.window_mm is None and "whole body" in located.reason


def test_segment_reports_the_searched_range(small_weights):
    from autocontour.pipeline import Segmenter

    result = Segmenter(weights=small_weights, device="cpu").segment(
        EXAMPLE_CT, options=SegmentOptions(structures="bladder", support_size=2))
    bladder = result.summary.structures["bladder"]
    lo, hi = bladder.searched_z_mm
    assert lo < 110 and 180 < hi < 260
    if bladder.z_range_mm:
        assert lo - 1 <= bladder.z_range_mm[0] and bladder.z_range_mm[1] <= hi + 1


def test_a_profile_of_the_right_shape_but_a_fraction_of_the_bone_is_no_match():
    # A stretch of lumbar spine can correlate with a pelvis; it has far less bone.
    shape = np.sin(np.linspace(0, 6, 60)) * 100 + 200
    source = Profile(0.0, tuple(float(v) for v in shape))
    assert match(source, Profile(0.0, tuple(float(v) for v in shape / 1.5))).score > 0.99  # a smaller patient
    assert match(source, Profile(0.0, tuple(float(v) for v in shape / 6))) is None


def test_a_confident_match_outside_the_scan_means_not_in_scan():
    full = CanonicalCT(read_ct(EXAMPLE_CT))
    upper = CanonicalCT(full.image[:, :, 60:])  # the upper abdomen only: no pelvis
    source = discover([ROOT / "support_sets"])["bladder"].manifest.source_cases[0]
    z = upper.slice_positions_mm()
    located = localise([(Profile.from_dict(source.bone_profile), tuple(source.extent_mm))], _profile(upper),
                     (z[0], z[-1]))
    assert located.verdict == "not_in_scan" and located.score > 0.85
    assert located.expected_mm[1] < z[0] and "the scan spans" in located.reason


def test_a_doubtful_match_outside_the_scan_searches_the_whole_body():
    rng = np.random.default_rng(3)
    shape = np.sin(np.linspace(0, 9, 90)) * 100 + 400
    source = Profile(0.0, tuple(float(v) for v in shape))
    query = Profile(0.0, tuple(float(v) for v in shape[20:80] + rng.normal(0, 60, 60)))  # a noisy part of it
    found = match(source, query)
    assert found is not None and 0.6 <= found.score < 0.85
    located = localise([(source, (262.0, 268.0))], query, (0.0, 177.0))  # the structure lies above the scan
    assert located.verdict == "whole_body" and "not trusted" in located.reason


def test_air_tells_a_chest_from_a_pelvis():
    # Same bone profile, but lungs along the query where the source has none: no match.
    shape = np.sin(np.linspace(0, 6, 60)) * 100 + 200
    no_air, lungs = tuple(0.0 for _ in shape), tuple(8000.0 for _ in shape)
    source = Profile(0.0, tuple(float(v) for v in shape), no_air)
    assert match(source, Profile(0.0, tuple(float(v) for v in shape), no_air)).score > 0.99
    assert match(source, Profile(0.0, tuple(float(v) for v in shape), lungs)) is None
