"""Thresholding, clean-up, overlap rules and confidence do what the docs say."""

from __future__ import annotations

import numpy as np

from autocontour.catalogue import BUILTIN
from autocontour.postprocess import confidence, fill_holes_per_slice, keep_components
from autocontour.postprocess import postprocess as run_postprocess
from autocontour.rules import load_rules

RULES = load_rules()
conflicts = RULES.conflicts


def postprocess(probabilities, threshold):
    """The pipeline's stage with the shipped rules and the built-in component counts."""
    return run_postprocess(probabilities, threshold, RULES, {n: d.max_components for n, d in BUILTIN.items()})


def test_rule_table_matches_the_source_document():
    assert conflicts("ctvn", "ctvp") and conflicts("ctvn", "anorectum") and conflicts("ctvp", "anorectum")
    assert not conflicts("bladder", "ctvn")
    assert all(not conflicts("parametrium", s) for s in ("bladder", "anorectum", "ctvn", "ctvp"))
    assert conflicts("bladder", "anorectum") and conflicts("bladder", "ctvp")
    assert len(RULES.exclusive_pairs(list(BUILTIN))) == 5


def test_contested_voxels_go_to_the_more_probable_structure():
    shape = (4, 20, 20)
    ctvn, anorectum, bladder = (np.zeros(shape, np.float32) for _ in range(3))
    ctvn[:, 2:12, 2:12] = 0.9
    anorectum[:, 8:18, 8:18] = 0.7
    anorectum[:, 8:12, 10:12] = 0.95  # anorectum wins this strip of the overlap
    bladder[:, 2:6, 2:6] = 0.8  # bladder may overlap CTVn
    masks, changes = postprocess({"ctvn": ctvn, "anorectum": anorectum, "bladder": bladder}, 0.5)
    assert not (masks["ctvn"].mask & masks["anorectum"].mask).any()
    assert masks["anorectum"].mask[:, 8:12, 10:12].all()
    assert masks["ctvn"].mask[:, 8:12, 8:10].all() and not masks["anorectum"].mask[:, 8:12, 8:10].any()
    assert (masks["bladder"].mask & masks["ctvn"].mask).sum() == 4 * 16
    lost = {c["structure"]: c for c in changes}
    assert lost["anorectum"]["voxels_removed"] == 4 * 8 and lost["anorectum"]["given_to"] == {"ctvn": 32}
    assert lost["ctvn"]["voxels_removed"] == 4 * 8 and lost["ctvn"]["given_to"] == {"anorectum": 32}
    assert masks["anorectum"].changes["overlap_rules"] == -32


def test_three_way_conflicts_are_resolved_per_voxel():
    shape = (1, 4, 4)
    probs = {"ctvn": np.full(shape, 0.7, np.float32), "bladder": np.full(shape, 0.9, np.float32),
             "anorectum": np.full(shape, 0.8, np.float32)}
    masks, _ = postprocess(probs, 0.5)
    # bladder (0.9) first; anorectum (0.8) conflicts with bladder; ctvn (0.7) may share with bladder
    assert masks["bladder"].mask.all() and masks["ctvn"].mask.all() and not masks["anorectum"].mask.any()


def test_holes_and_islands():
    mask = np.zeros((5, 30, 30), dtype=bool)
    mask[:, 5:20, 5:20] = True
    mask[:, 10:14, 10:14] = False  # a hole
    mask[2, 25:27, 25:27] = True  # an island, far smaller than a tenth
    filled = fill_holes_per_slice(mask)
    assert filled[:, 10:14, 10:14].all()
    kept = keep_components(filled, max_components=2)
    assert not kept[2, 25:27, 25:27].any() and kept[:, 5:20, 5:20].all()


def test_a_piece_the_registration_prior_places_survives_the_component_limit():
    mask = np.zeros((5, 40, 40), dtype=bool)
    mask[:, 5:20, 5:20] = True  # the largest piece
    mask[2, 25:27, 25:27] = True  # a loop the prior shows: far smaller than a tenth of the largest
    mask[2, 35:37, 5:7] = True  # a stray island the prior does not show
    supported = np.zeros_like(mask)
    supported[1:4, 24:30, 24:30] = True
    kept = keep_components(mask, max_components=1, supported=supported)
    assert kept[2, 25:27, 25:27].all() and kept[:, 5:20, 5:20].all()
    assert not kept[2, 35:37, 5:7].any()
    half_inside = supported.copy()
    half_inside[2, 25, 25:27] = False  # two of its four voxels outside: still mostly supported
    assert keep_components(mask, 1, half_inside)[2, 25:27, 25:27].all()
    half_inside[2, 26, 25] = False  # three of four outside
    assert not keep_components(mask, 1, half_inside)[2, 25:27, 25:27].any()


def test_confidence_is_high_for_crisp_maps_and_flags_problems():
    mask = np.zeros((10, 20, 20), dtype=bool)
    mask[2:8, 5:15, 5:15] = True
    mask[5, 5:7, 5:7] = True  # area collapses on slice 5
    mask[5, 7:15, 5:15] = False
    crisp = mask.astype(np.float32)
    agreement = np.ones(10, np.float32)
    computed = np.ones(10, bool)
    good = confidence(mask, crisp, agreement, computed, pixel_area_mm2=9.0)
    assert good.structure == 1.0 and set(good.per_slice) == set(range(2, 8))
    assert any(f["slice"] == 5 and "area" in f["reason"] for f in good.flagged)
    fuzzy = crisp * 0.55
    agreement[3] = 0.5
    weak = confidence(mask, fuzzy, agreement, computed, pixel_area_mm2=9.0)
    assert weak.structure < good.structure
    assert weak.per_slice[3] < weak.per_slice[2] < 1
    assert any(f["slice"] == 3 and "low confidence" in f["reason"] for f in weak.flagged)
    edge = np.zeros_like(mask)
    edge[0:3, 5:10, 5:10] = True
    assert any("inferior edge of the scan" in f["reason"] for f in confidence(
        edge, edge.astype(np.float32), np.ones(10), computed, 9.0).flagged)
    assert confidence(np.zeros_like(mask), crisp, agreement, computed, 9.0).structure is None
