"""Cross-patient training data: seeded domain randomisation, HU tasks, and episodes across virtual patients."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.phantom import make_phantom
from autocontour.training.data import TrainingDataRecipe, prepare_training_data
from autocontour.training.dataset import load_training_data
from autocontour.training.episodes import CROP_PLANE, TaskSampler
from autocontour.training.hu_tasks import hu_task_masks
from autocontour.training.randomise import DomainRandomisation, random_patient
from autocontour.training.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(31, female=True)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory, phantom):
    """Two labelled phantoms on disk, each with two training draws and one validation draw."""
    root = tmp_path_factory.mktemp("recipe")
    cases = []
    for seed, p in ((31, phantom), (32, make_phantom(32))):
        folder = root / f"phantom{seed}"
        folder.mkdir()
        sitk.WriteImage(p.ct, str(folder / "ct.nii.gz"))
        sitk.WriteImage(p.labels, str(folder / "labels.nii.gz"))
        (folder / "labels.json").write_text(json.dumps({str(v): n for n, v in p.names.items()}))
        cases.append({"ct": f"phantom{seed}/ct.nii.gz", "labels": f"phantom{seed}/labels.nii.gz",
                      "patient": f"phantom{seed}", "licence": "synthetic", "draws": 2, "validation_draws": 1,
                      "crops": 2})
    recipe = TrainingDataRecipe.model_validate({"cases": cases})
    return load_training_data(prepare_training_data(recipe.items(root), root / "data.safetensors", workers=2))


def test_randomisation_is_seeded_and_reproducible(phantom):
    a = random_patient(phantom.ct, phantom.labels, phantom.names, seed=5)
    b = random_patient(phantom.ct, phantom.labels, phantom.names, seed=5)
    c = random_patient(phantom.ct, phantom.labels, phantom.names, seed=6)
    for image in ("ct", "labels", "hu_bits"):
        assert np.array_equal(sitk.GetArrayFromImage(getattr(a, image)), sitk.GetArrayFromImage(getattr(b, image)))
    assert a.parameters == b.parameters and a.ct.GetSpacing() == b.ct.GetSpacing()
    assert a.parameters != c.parameters
    assert a.labels.GetSize() == a.ct.GetSize() == a.hu_bits.GetSize()
    r = DomainRandomisation()
    for p in (a, c):
        assert r.slice_mm[0] <= p.parameters["slice_mm"] <= r.slice_mm[1]
        assert r.pixel_mm[0] <= p.parameters["pixel_mm"] <= r.pixel_mm[1]


def test_labels_travel_with_the_anatomy(phantom):
    """The bladder of a virtual patient is where its bright phantom bladder went: labels and HU agree."""
    drawn = random_patient(phantom.ct, phantom.labels, phantom.names, seed=11,
                           randomisation=DomainRandomisation(
                               noise_hu=(0, 0), metal_probability=0, bladder_contrast_probability=1.0,
                               bladder_contrast_hu=(600, 600), fov_probabilities={"full": 1}))
    hu = sitk.GetArrayFromImage(drawn.ct)
    bladder = sitk.GetArrayFromImage(drawn.labels) == phantom.names["urinary_bladder"]
    assert bladder.sum() > 100
    assert np.median(hu[bladder]) > np.median(hu[~bladder]) + 400


def test_hu_tasks_follow_their_rules(phantom):
    hu = sitk.GetArrayFromImage(phantom.ct).astype(np.float32)
    masks = hu_task_masks(hu, phantom.ct.GetSpacing()[::-1])
    body = masks["body"]
    assert body.mean() > 0.1
    for name in ("bone", "fat", "soft_tissue", "lungs", "bowel_gas"):
        assert not (masks[name] & ~body).any(), name
    assert masks["bone"].any() and np.median(hu[masks["bone"]]) > 200
    assert not (masks["bone"] & masks["soft_tissue"]).any()
    fewer = hu_task_masks(hu, phantom.ct.GetSpacing()[::-1], tasks=("body", "fat"))
    assert set(fewer) == {"body", "fat"} and np.array_equal(fewer["body"], body)


def test_episodes_take_support_and_query_from_different_virtual_patients(recipe_data):
    data = recipe_data
    roles = [v["role"] for v in data.volumes]
    assert roles.count("validation") == 2 and roles.count("train") == 6
    assert CROP_PLANE in set(data.plane.tolist()) and data.hu_bits.any()
    sampler = TaskSampler(data, set(), seed=4)
    kinds, crossed = set(), 0
    for _ in range(60):
        q, ql, si, sl, task = sampler.episode(4)
        kinds.add(task.kind)
        elsewhere = task.kind == "synthetic" or len(sampler.by_task[(task.names[0], task.plane)]) > 1
        assert (task.query_volume != task.support_volume) or not elsewhere
        crossed += task.query_volume != task.support_volume
        if task.kind != "synthetic" and task.query_volume != task.support_volume:  # synthetic: painted over
            own = data.images[data.volume == task.support_volume].astype(np.float32)
            assert all(any(np.array_equal(s, x) for x in own) for s in si)
            assert not any(np.array_equal(q, x) for x in own)
    assert {"label", "synthetic"} <= kinds and crossed >= 50


def test_validation_patients_are_never_trained_on(tmp_path, recipe_data):
    validation = {i for i, v in enumerate(recipe_data.volumes) if v["role"] == "validation"}
    config = TrainConfig(steps=2, batch_size=2, support_size=3, encoder_blocks=[8, 8, 8, 8], validation_episodes=6,
                         heldout_structures=["sacrum"], device="cpu")
    trainer = Trainer(recipe_data, tmp_path / "run", config)
    assert not np.isin(trainer.sampler.data.volume, list(validation)).any()
    assert set(trainer.validation) == {"heldout_virtual_patients", "heldout_structures"}
    patients = [v["patient"] for v in recipe_data.volumes]
    for _, _, _, _, task in trainer.validation["heldout_virtual_patients"]:
        assert task.query_volume in validation and task.support_volume not in validation
        assert patients[task.query_volume] != patients[task.support_volume]  # another patient, as in use
    for _, _, _, _, task in trainer.validation["heldout_structures"]:
        assert task.names == ("sacrum",) and task.query_volume != task.support_volume
