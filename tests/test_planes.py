"""Three planes (`planes="three"`): coronal and sagittal cuts, their examples from the atlas copies, and the mean.

The geometry is tested here on phantoms and the seeded small network; whether the planes help on a new
patient is measured by bench/cross_patient.py (the "hybrid+planes" column).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.engine.planes import atlas_examples, cut, plane_mean, uncut, window_rows_mm
from autocontour.options import SegmentOptions
from autocontour.pipeline import Segmenter
from autocontour.support.build import build_support_set
from autocontour.support.registration import MASK_SCALE


@pytest.fixture(scope="module")
def bladder_set(tmp_path_factory, phantom_cases):
    out = tmp_path_factory.mktemp("planes") / "urinary_bladder"
    names = {v: int(k) for k, v in json.loads((phantom_cases[0][1].parent / "labels.json").read_text()).items()}
    return build_support_set("urinary_bladder", "urinary_bladder", phantom_cases, out, size=8,
                             label=names["urinary_bladder"], preview=False, symmetric=True)


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_a_cut_and_its_inverse_give_the_volume_back(plane):
    """Linear interpolation along z, there and back, is exact for a field linear in z; the end slices reach
    half a slice beyond their centres, so they come back within a small error; nothing is drawn beyond the
    cut positions or on slices the window misses."""
    rng = np.random.default_rng(0)
    z_mm = 10.0 + 2.5 * np.arange(40)
    volume = ((0.3 + 0.01 * z_mm)[:, None, None] * rng.random((1, 16, 16))).astype(np.float32)
    positions = np.arange(3, 12)
    rows_mm = window_rows_mm(60.0, 1.7, 128)
    cuts = cut(volume, z_mm, plane, positions, rows_mm)
    assert cuts.shape == (len(positions), 128, 16)
    back, reached = uncut(cuts, rows_mm, plane, positions, z_mm, volume.shape)
    assert reached.all()
    take = (slice(None), positions, slice(None)) if plane == "coronal" else (slice(None), slice(None), positions)
    error = np.abs(back[take] - volume[take]).max(axis=(1, 2))
    assert error[1:-1].max() < 1e-5 and error.max() < 0.01
    outside = np.ones(16, dtype=bool)
    outside[positions] = False
    assert not (back[:, outside, :] if plane == "coronal" else back[:, :, outside]).any()

    short = window_rows_mm(60.0, 0.5, 128)  # rows from z 28.25 to 91.75 mm: slices 8 (z 30) to 32 (z 90)
    _, reached = uncut(cut(volume, z_mm, plane, positions, short), short, plane, positions, z_mm, volume.shape)
    assert np.array_equal(np.nonzero(reached)[0], np.arange(8, 33))


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_the_examples_are_cut_through_the_structure_at_the_views_scale(bladder_set, plane):
    """Every example shows the structure; the cuts span it from level 0 to 1; a cut's label spans the
    structure's z extent at the view's pixel size (the rows are isotropic with the columns)."""
    atlas = bladder_set.atlas_cases()["case0"]
    examples = atlas_examples(atlas, bladder_set.manifest.preprocessing, plane)
    assert examples is not None and len(examples.levels) >= 5
    assert examples.labels.reshape(len(examples.levels), -1).any(axis=1).all()
    assert examples.levels.min() == 0.0 and examples.levels.max() == 1.0
    assert 0 <= examples.images.min() and examples.images.max() <= 1

    occupancy = sitk.GetArrayFromImage(atlas.mask) >= MASK_SCALE / 2
    slices = np.nonzero(occupancy.any(axis=(1, 2)))[0]
    extent_mm = (slices[-1] - slices[0] + 1) * atlas.mask.GetSpacing()[2]
    rows = examples.labels.any(axis=2).sum(axis=1).max()  # the tallest cut, in rows
    assert abs(rows * _pixel_mm(atlas, bladder_set) - extent_mm) <= 2 * atlas.mask.GetSpacing()[2]


def _pixel_mm(atlas, support) -> float:
    from autocontour.io import CanonicalCT
    from autocontour.preprocess import prepare

    return prepare(CanonicalCT(sitk.Cast(atlas.ct, sitk.sitkFloat32)), support.manifest.preprocessing).pixel_mm


def test_the_planes_are_averaged_where_they_reach_and_the_axial_pass_stands_alone_elsewhere():
    axial = np.full((4, 2, 2), 0.8, dtype=np.float32)
    coronal = np.full((4, 2, 2), 0.2, dtype=np.float32)
    sagittal = np.full((4, 2, 2), 0.5, dtype=np.float32)
    computed = np.array([True, True, True, False])
    mean = plane_mean(axial, computed, [(coronal, np.array([True, True, False, True])),
                                        (sagittal, np.array([True, False, False, True]))])
    assert np.allclose(mean[0], 0.5) and np.allclose(mean[1], 0.5) and np.allclose(mean[2], 0.8)
    assert not mean[3].any()


def test_three_planes_run_through_segment_from_the_other_cases_atlas_copies(small_weights, bladder_set,
                                                                           phantom_cases):
    segmenter = Segmenter(weights=small_weights, device="cpu", support_dirs=[bladder_set.path], shipped_support=False)
    query = phantom_cases[0][0]  # a source case: only the other case's atlas copy may give examples
    bladder = SegmentOptions(structures="urinary_bladder", support_size=4, prior_weight=0.5)
    axial = segmenter.segment(query, None, bladder)
    three = segmenter.segment(query, None, bladder.model_copy(update={"planes": "three"}))
    entry, axial_entry = three.summary.structures["urinary_bladder"], axial.summary.structures["urinary_bladder"]
    assert axial_entry.planes == {"axial": axial_entry.slices_computed}
    assert set(entry.planes) == {"axial", "coronal", "sagittal"} and min(entry.planes.values()) > 0
    assert entry.query_support_pairs == axial_entry.query_support_pairs + 4 * (
        entry.planes["coronal"] + entry.planes["sagittal"])
    assert entry.registration_prior["source_cases"] == ["case1"]
    assert not any("atlas" in w for w in entry.warnings)

    prior_alone = segmenter.segment(query, None, bladder.model_copy(update={"prior_weight": 1.0, "planes": "three"}))
    assert prior_alone.summary.structures["urinary_bladder"].planes == {
        "axial": prior_alone.summary.structures["urinary_bladder"].slices_computed}
