"""Bone profiles bound where along z a structure is searched."""

from __future__ import annotations

import numpy as np
from conftest import EXAMPLE_CT, ROOT

from app.io import CanonicalCT, read_ct
from app.support import discover
from app.support.localize import Profile, bone_profile, expected_range, match


def _profile(ct: CanonicalCT) -> Profile:
    return bone_profile(ct.array, ct.spacing_zyx, ct.slice_positions_mm())


def test_a_cropped_scan_matches_and_the_window_covers_the_bladder():
    full = CanonicalCT(read_ct(EXAMPLE_CT))
    cropped = CanonicalCT(full.image[:, :, 5:80])  # another scan range of the same patient
    source = discover([ROOT / "support_sets"])["bladder"].manifest.source_cases[0]
    found = match(Profile.from_dict(source.bone_profile), _profile(cropped))
    assert found.score > 0.95 and abs(found.scale - 1) < 0.03 and abs(found.shift_mm) < 6
    (lo, hi), score = expected_range([(Profile.from_dict(source.bone_profile), tuple(source.extent_mm))],
                                     _profile(cropped))
    assert lo <= source.extent_mm[0] and hi >= source.extent_mm[1]
    assert hi < full.slice_positions_mm()[-1] - 100  # the upper abdomen is not searched for a bladder


def test_a_scan_without_matching_skeleton_gives_no_window():
    flat = Profile(0.0, tuple(np.random.default_rng(0).random(80)))
    source = Profile(0.0, tuple(float(v) for v in np.sin(np.linspace(0, 6, 60)) * 100 + 200))
    window, score = expected_range([(source, (30.0, 60.0))], flat)
    assert window is None and score < 0.6


def test_segment_reports_the_searched_range(small_weights):
    from app.pipeline import Segmenter

    result = Segmenter(weights=small_weights, device="cpu").segment(EXAMPLE_CT, structures="bladder", support_size=2)
    bladder = result.summary["structures"]["bladder"]
    lo, hi = bladder["searched_z_mm"]
    assert lo < 110 and 180 < hi < 260
    if bladder["z_range_mm"]:
        assert lo - 1 <= bladder["z_range_mm"][0] and bladder["z_range_mm"][1] <= hi + 1


def test_a_profile_of_the_right_shape_but_a_fraction_of_the_bone_is_no_match():
    # A stretch of lumbar spine can correlate with a pelvis; it has far less bone.
    shape = np.sin(np.linspace(0, 6, 60)) * 100 + 200
    source = Profile(0.0, tuple(float(v) for v in shape))
    assert match(source, Profile(0.0, tuple(float(v) for v in shape / 1.5))).score > 0.99  # a smaller patient
    assert match(source, Profile(0.0, tuple(float(v) for v in shape / 6))) is None
