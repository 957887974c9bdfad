"""Propagation from a patient's own drawn slices (issue 30) and the interpolation baselines it is measured against.

A small seeded network on the example pelvis CT's bladder: the network's quality does not matter here, only the
contract (drawn slices exact, provenance honest, ends bounded). The interpolations are checked on shapes whose
answer is known: a cylinder and a cone.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.engine.propagation import DRAWN, PROPAGATED, WEIGHTS, Propagation, PropagationOptions, propagate
from autocontour.engine.refinement import DRAFT, DRAFT_WINDOW_MM, Correction, refine, suggest_next
from autocontour.engine.runner import Engine
from autocontour.evaluation.interpolation import mci_interpolate, sdf_interpolate, signed_distance
from autocontour.evaluation.metrics import dice
from autocontour.io import CanonicalCT, read_ct
from autocontour.model.weights import load_model
from tests.conftest import EXAMPLE_CT, EXAMPLE_LABELS

BLADDER = 104  # examples/pelvis_ct/labels.json


@pytest.fixture(scope="module")
def bladder_case() -> tuple[CanonicalCT, np.ndarray, list[int]]:
    ct = CanonicalCT(read_ct(EXAMPLE_CT))
    mask = ct.to_canonical(sitk.ReadImage(str(EXAMPLE_LABELS))) == BLADDER
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    middle = (int(zs.min()) + int(zs.max())) // 2
    return ct, mask, [middle - 4, middle, middle + 4]


@pytest.fixture(scope="module")
def engine(small_weights) -> Engine:
    model, _ = load_model(small_weights)
    return Engine(model, "cpu", "float32", threads=2)


@pytest.fixture(scope="module")
def results(engine, bladder_case) -> dict[bool, Propagation]:
    ct, mask, drawn = bladder_case
    return {ends: propagate(engine, ct, mask, drawn, PropagationOptions(ends_drawn=ends, max_extension_mm=15.0))
            for ends in (True, False)}


@pytest.mark.parametrize("ends", [True, False])
def test_drawn_slices_come_back_exactly(results, bladder_case, ends):
    _, mask, drawn = bladder_case
    result = results[ends]
    assert np.array_equal(result.mask[drawn], mask[drawn])
    assert np.array_equal(result.probability[drawn], mask[drawn].astype(np.float32))
    assert (result.provenance[drawn] == DRAWN).all()


@pytest.mark.parametrize("ends", [True, False])
def test_structure_only_on_slices_the_result_names(results, ends):
    result = results[ends]
    filled = np.nonzero(result.mask.any(axis=(1, 2)))[0]
    assert set(filled) <= set(np.nonzero(result.provenance)[0])
    low, high = result.ends[0].last_slice, result.ends[1].last_slice
    assert set(np.nonzero(result.provenance)[0]) == set(range(low, high + 1))
    assert not result.probability[:low].any() and not result.probability[high + 1:].any()
    if result.next_slice is not None:
        assert result.provenance[result.next_slice] == PROPAGATED


def test_ends_drawn_stops_at_the_drawn_ends(results, bladder_case):
    _, _, drawn = bladder_case
    result = results[True]
    assert [(e.side, e.last_slice, e.reason) for e in result.ends] == [
        ("inferior", drawn[0], "drawn"), ("superior", drawn[-1], "drawn")]
    assert set(result.propagated_slices) == set(range(drawn[0] + 1, drawn[-1])) - set(drawn)


def test_undrawn_ends_stop_within_the_bound_and_say_why(results, bladder_case):
    ct, _, drawn = bladder_case
    result = results[False]
    reach = round(15.0 / ct.spacing_zyx[0])
    inferior, superior = result.ends
    assert drawn[0] - reach <= inferior.last_slice <= drawn[0]
    assert drawn[-1] <= superior.last_slice <= drawn[-1] + reach
    assert {inferior.reason, superior.reason} <= {"structure ended", "limit", "scan edge"}


def test_propagate_refuses_nothing_drawn(engine, bladder_case):
    ct, mask, _ = bladder_case
    empty = int(np.nonzero(~mask.any(axis=(1, 2)))[0][0])
    with pytest.raises(ValueError, match="nothing is drawn"):
        propagate(engine, ct, mask, [empty])


def _cone(radius_at: callable, shape=(21, 48, 48)) -> np.ndarray:
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    return (y - 24) ** 2 + (x - 24) ** 2 <= radius_at(z) ** 2


def test_signed_distance_gives_the_slice_back():
    disc = _cone(lambda z: 7.5)[0]
    assert np.array_equal(signed_distance(disc, (1.0, 1.0)) < 0, disc)
    assert (signed_distance(np.zeros_like(disc), (1.0, 1.0)) > 0).all()


@pytest.mark.parametrize("interpolate", ["sdf", "mci"])
def test_interpolation_keeps_drawn_slices_and_fills_a_cylinder(interpolate):
    cylinder = _cone(lambda z: 7.5 + 0 * z)
    drawn = [0, 10, 20]
    if interpolate == "mci":
        pytest.importorskip("itk")
        out = mci_interpolate(cylinder, drawn, (2.0, 1.0, 1.0))
    else:
        out = sdf_interpolate(cylinder, drawn, (1.0, 1.0))
    assert np.array_equal(out[drawn], cylinder[drawn])
    assert np.array_equal(out, cylinder)


def test_sdf_interpolates_a_cone_and_nothing_beyond_the_drawn_ends():
    cone = _cone(lambda z: 3 + 0.5 * z, shape=(25, 48, 48))
    out = sdf_interpolate(cone, [2, 22], (1.0, 1.0))
    assert np.array_equal(out[[2, 22]], cone[[2, 22]])
    assert not out[:2].any() and not out[23:].any()
    for z in range(3, 22):  # concentric discs: the blended distance's zero level is the linear radius
        radius = np.sqrt(out[z].sum() / np.pi)
        assert abs(radius - (3 + 0.5 * z)) < 0.6, z
        assert dice(out[z], cone[z]) > 0.8, z


def test_auto_weight_and_refine_keep_the_contract(engine, bladder_case):
    ct, mask, drawn = bladder_case
    result = propagate(engine, ct, mask, drawn, PropagationOptions(auto_weight=True, refine=2, whole_view=True))
    assert result.prior_weight in WEIGHTS
    assert np.array_equal(result.mask[drawn], mask[drawn])
    assert set(np.nonzero(result.mask.any(axis=(1, 2)))[0]) <= set(range(drawn[0], drawn[-1] + 1))


def _disc(centre: int, radius: int = 3, size: int = 16) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - size // 2) ** 2 + (x - centre) ** 2 <= radius ** 2


def test_suggestion_bisects_the_run_bridging_the_most_change():
    """A short run between contours that differ beats a longer one between equal contours; its middle."""
    provenance = np.array([0, DRAWN, PROPAGATED, PROPAGATED, PROPAGATED, DRAWN] + [PROPAGATED] * 4 + [DRAWN, 0],
                          dtype=np.uint8)
    mask = np.zeros((len(provenance), 16, 16), dtype=bool)
    mask[1], mask[5], mask[10] = _disc(4), _disc(11), _disc(11)
    mask[provenance == PROPAGATED] = _disc(8)
    assert suggest_next(provenance, mask, 3.0) == 3
    mask[1] = _disc(11)  # now both runs bridge equal contours: the longer one wins
    assert suggest_next(provenance, mask, 3.0) == 7


def test_suggestion_goes_first_to_a_draft_run_no_correction_reached():
    runs = int(2 * DRAFT_WINDOW_MM / 3.0) + 2
    provenance = np.array([DRAFT] * runs + [PROPAGATED, DRAWN, PROPAGATED], dtype=np.uint8)
    mask = np.zeros((len(provenance), 16, 16), dtype=bool)
    mask[provenance > 0] = _disc(8)
    assert suggest_next(provenance, mask, 3.0) == (runs - 1) // 2
    assert suggest_next(np.zeros(4, dtype=np.uint8), np.zeros((4, 16, 16), dtype=bool), 3.0) is None


def test_refine_keeps_the_correction_and_suggests_a_propagated_slice(engine, results, bladder_case):
    ct, mask, _ = bladder_case
    first = results[True]
    z = int(first.propagated_slices[len(first.propagated_slices) // 2])
    out = refine(engine, ct, Correction(first.mask, first.provenance, mask, (z,)), PropagationOptions())
    assert np.array_equal(out.mask[z], mask[z]) and out.provenance[z] == DRAWN
    assert out.next_slice is None or out.provenance[out.next_slice] == PROPAGATED
