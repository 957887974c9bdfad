"""Structure-centred crops: the geometry maps back onto the CT exactly, edges are padded, sets store them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.io import CanonicalCT
from autocontour.options import SegmentOptions
from autocontour.phantom import make_phantom
from autocontour.preprocess import (
    AIR_HU,
    ModelInput,
    PreprocessSpec,
    crop_grid,
    grid_to_canonical,
    mask_centre_mm,
    mask_to_grid,
    prepare_crop,
)
from autocontour.support.build import build_support_set


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=4)


def _mask(phantom, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(phantom.labels) == phantom.names[name]


def test_a_mask_through_a_crop_and_back_is_unchanged(phantom):
    ct = CanonicalCT(phantom.ct)
    bladder = _mask(phantom, "urinary_bladder")
    size, pixel = 32, ct.image.GetSpacing()[0]  # crop pixels = CT pixels, centred on a voxel: no interpolation
    centre_index = np.round(np.argwhere(bladder).mean(axis=0)).astype(int)[::-1]
    centre = ct.image.TransformIndexToPhysicalPoint([int(c) for c in centre_index])[:2]
    centre = (centre[0] - pixel / 2, centre[1] - pixel / 2)  # an even crop has its centre between two voxels
    grid = crop_grid(ct, centre, size * pixel, size)
    cropped = mask_to_grid(bladder, ct, grid)
    assert cropped.sum() == bladder.sum()  # the whole bladder is inside the crop
    back = grid_to_canonical(cropped.astype(np.float32), ModelInput(cropped, grid, bladder.any(axis=(1, 2)),
                                                                    PreprocessSpec()), ct) > 0.5
    assert np.array_equal(back, bladder)


def test_a_finer_crop_keeps_the_structure_where_it_was(phantom):
    ct = CanonicalCT(phantom.ct)
    bladder = _mask(phantom, "urinary_bladder")
    centre = mask_centre_mm(bladder, ct.image)
    grid = crop_grid(ct, centre, 100.0, 128)  # 0.78 mm pixels on a 4 mm scan
    cropped = mask_to_grid(bladder, ct, grid)
    back = grid_to_canonical(cropped.astype(np.float32), ModelInput(cropped, grid, bladder.any(axis=(1, 2)),
                                                                    PreprocessSpec()), ct) > 0.5
    dice = 2 * (back & bladder).sum() / (back.sum() + bladder.sum())
    assert dice >= 0.95
    assert np.allclose(np.argwhere(back).mean(axis=0), np.argwhere(bladder).mean(axis=0), atol=0.25)


def test_a_crop_past_the_scan_edge_is_padded_not_shifted(phantom):
    ct = CanonicalCT(phantom.ct)
    corner = ct.image.GetOrigin()[:2]
    spec = PreprocessSpec()
    view = prepare_crop(ct, spec, corner, 80.0, np.ones(ct.array.shape[0], bool))
    assert np.allclose(view.grid.TransformContinuousIndexToPhysicalPoint([(spec.size - 1) / 2] * 2 + [0])[:2],
                       corner)
    assert np.all(view.images[:, : spec.size // 2 - 1, :] == spec.window(np.array(AIR_HU)))  # beyond the scan: air


def test_a_built_set_stores_crops_and_the_engine_centres_them(tmp_path, phantom_cases, small_weights):
    from autocontour.pipeline import Segmenter

    names = {v: int(k) for k, v in json.loads((phantom_cases[0][1].parent / "labels.json").read_text()).items()}
    support = build_support_set("urinary_bladder", "urinary_bladder", phantom_cases, tmp_path / "set", size=8,
                                label=names["urinary_bladder"], preview=False, symmetric=True)
    crop = support.manifest.crop
    assert crop is not None and crop.margin_mm >= 15.0
    assert support.crop_images.shape == support.images.shape
    assert all(c.crop_centre_mm for c in support.manifest.source_cases)
    # the crop shows the bladder several times larger than the whole view
    assert support.crop_labels.sum() > 3 * support.labels.sum()

    query = phantom_cases[1][0].parent.parent / "query.nii.gz"
    image = sitk.ReadImage(str(phantom_cases[1][0]))
    shifted = sitk.Resample(image, image, sitk.TranslationTransform(3, [5.0, 4.0, 0.0]), sitk.sitkLinear, -1000.0)
    sitk.WriteImage(shifted, str(query))
    segmenter = Segmenter(weights=small_weights, device="cpu", support_dirs=[tmp_path / "set"],
                          shipped_support=False)
    assert segmenter.segment(query, None, SegmentOptions(structures="urinary_bladder", support_size=4)
                             ).summary.structures["urinary_bladder"].crop is None  # off by default
    result = segmenter.segment(query, None, SegmentOptions(structures="urinary_bladder", support_size=4, crops=True))
    placed = result.summary.structures["urinary_bladder"].crop
    assert placed["placed_by"] == "registration prior" and placed["side_mm"] == crop.side_mm
