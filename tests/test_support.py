"""Recipes compose structures correctly; support sets are traceable data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import RECIPES

from autocontour.errors import SupportSetError
from autocontour.support.build import build_support_set
from autocontour.support.recipes import Recipe, load_recipes, margin, track_from_inferior
from autocontour.support.store import MANIFEST, TENSORS, discover, load_support_set


def test_margin_is_in_millimetres_on_anisotropic_spacing():
    mask = np.zeros((21, 41, 41), dtype=bool)
    mask[10, 20, 20] = True
    grown = margin(mask, 7.0, np.array([3.0, 1.0, 1.0]))
    zs, ys, xs = np.nonzero(grown)
    assert xs.max() - 20 == 7 and ys.max() - 20 == 7  # 7 mm in-plane = 7 voxels of 1 mm
    assert zs.max() - 10 == 2  # 7 mm through-plane = 2 slices of 3 mm (6 mm <= 7 < 9)
    assert not grown[10, 20, 28] and not grown[10, 25, 25] and grown[10, 24, 25]  # Euclidean: 7.07 > 7 >= 6.4 mm
    shrunk = margin(grown, -3.0, np.array([3.0, 1.0, 1.0]))
    assert shrunk.sum() < grown.sum() and shrunk[10, 20, 20]


def test_recipe_operations_on_a_label_map():
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[:, 5:10, 5:10] = 1  # "vessel"
    labels[:, 8:12, 8:12] = 2  # "bone" overlapping it
    labels[2:8, 15:18, 15:18] = 3  # "reference" from slice 2 to 7
    names = {"vessel": 1, "bone": 2, "ref": 3}
    spacing = (1.0, 1.0, 1.0)
    sub = Recipe("x", {"subtract": ["vessel", "bone"]}).evaluate(labels, names, spacing)
    assert sub.sum() == 10 * (25 - 4) and not sub[0, 9, 9]
    union = Recipe("x", {"union": ["vessel", {"label": 2}]}).evaluate(labels, names, spacing)
    assert union.sum() == 10 * (25 + 16 - 4)
    inter = Recipe("x", {"intersection": [{"expand": "vessel", "mm": 1}, "bone"]}).evaluate(labels, names, spacing)
    # bone voxels touching the vessel's faces
    assert inter.sum() == 10 * 3 and inter[:, 8, 9].all() and not inter[:, 9, 9].any()
    lower_half = Recipe("x", {"axial_limit": "vessel", "reference": "ref", "to_fraction": 0.5}).evaluate(
        labels, names, spacing)
    assert np.nonzero(lower_half.any(axis=(1, 2)))[0].tolist() == [0, 1, 2, 3, 4]  # z <= 2 + 0.5 * 5
    with pytest.raises(SupportSetError, match="'nerve' is not in the label map"):
        Recipe("x", {"union": ["vessel", "nerve"]}).evaluate(labels, names, spacing)
    missing: list[str] = []
    optional = Recipe("x", {"subtract": ["vessel", "nerve"]}, optional_labels=["nerve"])
    assert optional.evaluate(labels, names, spacing, missing).sum() == 10 * 21 and missing == ["nerve"]
    with pytest.raises(SupportSetError):
        Recipe("x", {"expand": "vessel"})  # no mm
    with pytest.raises(SupportSetError):
        Recipe("x", {"frobnicate": "vessel"})


def test_track_from_inferior_follows_one_tube():
    mask = np.zeros((6, 20, 20), dtype=bool)
    mask[:, 2:5, 2:5] = True  # the tube, through every slice
    mask[3:, 12:16, 12:16] = True  # a loop that appears higher up, beside it
    tracked = track_from_inferior(mask)
    assert tracked[:, 2:5, 2:5].all() and not tracked[:, 12:16, 12:16].any()


def test_shipped_recipes_on_the_example_labels():
    import SimpleITK as sitk
    from conftest import EXAMPLE_CT, EXAMPLE_LABELS

    from autocontour.io import CanonicalCT, read_ct

    ct = CanonicalCT(read_ct(EXAMPLE_CT))
    labels = ct.to_canonical(sitk.ReadImage(str(EXAMPLE_LABELS)))
    names = {v: int(k) for k, v in json.loads((EXAMPLE_LABELS.parent / "labels.json").read_text()).items()}
    recipes = load_recipes(RECIPES)
    assert set(recipes) == {"bladder", "anorectum", "ctvn", "ctvp"}
    voxel_ml = np.prod(ct.spacing_zyx) / 1000
    bladder = recipes["bladder"].evaluate(labels, names, ct.spacing_zyx)
    anorectum = recipes["anorectum"].evaluate(labels, names, ct.spacing_zyx)
    ctvn = recipes["ctvn"].evaluate(labels, names, ct.spacing_zyx)
    colon = labels == names["colon"]
    assert 100 < bladder.sum() * voxel_ml < 800
    assert anorectum.any() and (anorectum & ~colon).sum() == 0 and anorectum.sum() < colon.sum()
    assert not (ctvn & bladder).any() and not (ctvn & (labels == names["sacrum"])).any()
    vessels = np.isin(labels, [names[n] for n in ("iliac_artery_left", "iliac_artery_right")])
    assert (ctvn & vessels).sum() > 0.9 * vessels.sum()
    assert ctvn.sum() > 3 * vessels.sum()
    with pytest.raises(SupportSetError, match="'cervix' is not in the label map"):
        recipes["ctvp"].evaluate(labels, names, ct.spacing_zyx)


def test_build_support_set_from_phantoms(tmp_path, phantom_cases):
    recipes = load_recipes(RECIPES)
    support = build_support_set("bladder", "bladder", phantom_cases, tmp_path / "b", size=20,
                                recipe=recipes["bladder"], negative_fraction=0.2)
    m = support.manifest
    assert len(support) <= 20 and support.images.shape[1:] == (128, 128)
    assert {c.case for c in m.source_cases} == {"case0", "case1"}
    positives = [s for s in m.slices if s.foreground_pixels > 0]
    negatives = [s for s in m.slices if s.foreground_pixels == 0]
    assert negatives and all(s.level < 0 or s.level > 1 for s in negatives)
    assert all(0 <= s.level <= 1 for s in positives)
    assert min(s.level for s in positives) == 0 and max(s.level for s in positives) == 1
    assert all(support.labels[i].sum() == s.foreground_pixels for i, s in enumerate(m.slices))
    assert (tmp_path / "b" / "preview.png").stat().st_size > 10_000
    again = load_support_set(tmp_path / "b")
    assert again.id == support.id and again.id.startswith("bladder-")
    for name in (TENSORS, MANIFEST):  # readable by a server running as another user, as the umask allows
        assert (tmp_path / "b" / name).stat().st_mode & 0o777 == 0o666 & ~current_umask(), name


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_tampered_support_set_is_refused(tmp_path, phantom_cases):
    support = build_support_set("bladder", "bladder", phantom_cases[:1], tmp_path / "b", size=8, label=104,
                                preview=False)
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    manifest["slices"][0]["level"] = 0.5
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SupportSetError, match="content hash mismatch"):
        load_support_set(tmp_path / "b")
    (tmp_path / "b" / TENSORS).write_bytes(b"garbage")
    with pytest.raises(SupportSetError):
        load_support_set(tmp_path / "b")
    assert support.id


def test_later_folders_override_structures(tmp_path, phantom_cases, phantom_support_dir):
    own = build_support_set("bladder-clinic", "bladder", phantom_cases[1:], tmp_path / "clinic" / "b", size=6,
                            label=104, preview=False)
    found = discover([phantom_support_dir, tmp_path / "clinic"])
    assert found["bladder"].id == own.id and set(found) == {"bladder", "anorectum", "ctvn"}
    with pytest.raises(SupportSetError, match="not found"):
        discover([tmp_path / "missing"])


def test_shipped_support_sets_load_and_name_their_source():
    from conftest import ROOT

    found = discover([ROOT / "support_sets"])
    assert set(found) == {"bladder", "anorectum", "ctvn"}
    for support in found.values():
        assert len(support) >= 32
        assert support.manifest.recipe is not None
        assert "TotalSegmentator" in support.manifest.source
