"""Sets of many cases: which source cases are registered to a scan, and how their priors are fused.

Phantoms only (autocontour.phantom); what more cases give on real patients is bench/clinic.py's to measure.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.io import CanonicalCT, fingerprint
from autocontour.phantom import LABELS, make_phantom
from autocontour.preprocess import PreprocessSpec, mask_to_grid, prepare
from autocontour.support import choice
from autocontour.support.build import build_support_set
from autocontour.support.choice import AxialShape, axial_shape, choose_cases, shape_distance
from autocontour.support.prior import registration_priors
from autocontour.support.registration import make_atlas_ct
from autocontour.training.virtual import smooth_deformation

BLADDER = LABELS["urinary_bladder"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def shapes() -> dict[str, AxialShape]:
    """Axial shapes of twelve phantom patients' atlas copies."""
    return {f"case{seed}": axial_shape(make_atlas_ct(make_phantom(seed).ct)) for seed in range(12)}


def test_choosing_cases_is_bounded_and_repeatable_whatever_the_sets_size(shapes):
    query = shapes["case0"]
    sources = {case: shape for case, shape in shapes.items() if case != "case0"}
    for size in (1, 2, 5, 11):
        subset = dict(list(sources.items())[:size])
        chosen = choose_cases(query, subset, k=3)
        assert len(chosen) == min(3, size) and set(chosen) <= set(subset)
        assert choose_cases(query, dict(reversed(list(subset.items()))), k=3) == chosen  # order of the set: none
    # the nearest come first, and the query's own body is nearer than any other patient's
    ranked = choose_cases(query, shapes, k=len(shapes))
    distances = [shape_distance(shapes[case], query) for case in ranked]
    assert ranked[0] == "case0" and distances == sorted(distances) and distances[0] == 0.0


def test_ties_are_broken_by_case_id(shapes):
    twin = shapes["case3"]
    sources = {"b": twin, "c": twin, "a": twin, "z": shapes["case7"]}
    assert choose_cases(shapes["case3"], sources, k=2) == ["a", "b"]


def test_profiles_of_other_spacings_or_empty_scans_are_never_chosen_first(shapes):
    query = shapes["case0"]
    other_spacing = AxialShape(8.0, shapes["case1"].features)
    empty = AxialShape(4.0, np.zeros((0, 2)))
    assert shape_distance(other_spacing, query) == shape_distance(empty, query) == float("inf")
    assert choose_cases(query, {"a": other_spacing, "b": empty, "c": shapes["case2"]}, k=1) == ["c"]


def _deformed(ct: sitk.Image, labels: sitk.Image, seed: int, amplitude_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """A new 'patient': the phantom bent smoothly and shifted (seeded), with its labels moved alike."""
    rng = np.random.default_rng(seed)
    move = sitk.CompositeTransform(3)
    move.AddTransform(sitk.TranslationTransform(3, rng.uniform(-8, 8, 3).tolist()))
    move.AddTransform(smooth_deformation(ct, amplitude_mm, rng))
    return (sitk.Resample(ct, ct, move, sitk.sitkLinear, -1000.0, sitk.sitkFloat32),
            sitk.Resample(labels, labels, move, sitk.sitkNearestNeighbor, 0, labels.GetPixelID()))


@pytest.fixture(scope="module")
def patients(tmp_path_factory) -> dict[str, tuple]:
    """A query patient and three source patients, all bent from one phantom anatomy (files for the builder)."""
    phantom = make_phantom(0)
    folder = tmp_path_factory.mktemp("patients")
    out = {}
    for name, seed, amplitude in (("query", 100, 3.0), ("a", 1, 8.0), ("b", 2, 8.0), ("c", 3, 8.0)):
        ct, labels = _deformed(phantom.ct, phantom.labels, seed, amplitude)
        sitk.WriteImage(ct, str(folder / f"{name}_ct.nii.gz"))
        sitk.WriteImage(labels, str(folder / f"{name}_labels.nii.gz"))
        out[name] = (folder / f"{name}_ct.nii.gz", folder / f"{name}_labels.nii.gz", ct, labels)
    (folder / "labels.json").write_text(json.dumps({str(BLADDER): "urinary_bladder"}))
    return out


def test_a_set_of_several_cases_fuses_to_a_better_prior_than_its_best_single_case(tmp_path, patients):
    """Each source case alone, then all three in one set (majority vote), registered through the product's
    prior code; Dice of the prior (>= 0.5) against the query's truth on the model grid."""
    _, _, query_ct, query_labels = patients["query"]
    canonical = CanonicalCT(query_ct)
    model_input = prepare(canonical, PreprocessSpec())
    truth = mask_to_grid(canonical.to_canonical(query_labels) == BLADDER, canonical, model_input.grid) > 0
    scan = fingerprint(canonical.image)
    cache: dict = {}  # each source case registers once, alone or in the set

    def prior_dice(names: tuple[str, ...]) -> float:
        cases = [(patients[n][0], patients[n][1]) for n in names]
        support = build_support_set("urinary_bladder", "urinary_bladder", cases, tmp_path / "".join(names), size=8,
                                    label=BLADDER, preview=False, crop=False)
        priors, notes = registration_priors(canonical, {"urinary_bladder": support},
                                            {"urinary_bladder": model_input}, scan, cache)
        assert not notes and len(priors["urinary_bladder"].cases) == len(names)
        return dice(priors["urinary_bladder"].probability >= 0.5, truth)

    singles = [prior_dice((name,)) for name in ("a", "b", "c")]
    assert choice.CHOSEN_CASES >= 3
    fused = prior_dice(("a", "b", "c"))
    assert fused > max(singles), (fused, singles)
    assert len(cache) == 3
