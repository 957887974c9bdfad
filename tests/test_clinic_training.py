"""Training on a clinic's patients: folders of per-structure masks, cross-patient episodes, validation on a
validation split's patients among themselves, and runs that resume exactly where a session stopped."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from autocontour.cli import main
from autocontour.phantom import make_phantom
from autocontour.training.data import (
    PatientFolders,
    TrainingDataRecipe,
    Volume,
    load_recipe,
    merged_masks,
    prepare_training_data,
)
from autocontour.training.dataset import load_training_data
from autocontour.training.episodes import TaskSampler
from autocontour.training.train import TrainConfig, Trainer
from tests.conftest import ROOT

ORGANS = ["urinary_bladder", "sacrum", "femur_left", "femur_right"]
STRUCTURES = [*ORGANS, "target", "not_contoured"]


def write_patient(folder, seed: int):
    """A phantom patient as a planning system exports it: the CT and one 0/1 mask per contour, plus a target
    that overlaps the bladder (as a PTV overlaps organs). Returns the phantom."""
    phantom = make_phantom(seed, size=(64, 56, 28), spacing=(6.0, 6.0, 6.0), female=bool(seed % 2))
    folder.mkdir(parents=True)
    sitk.WriteImage(phantom.ct, str(folder / "ct.nii.gz"))
    labels = sitk.GetArrayFromImage(phantom.labels)
    masks = {name: labels == phantom.names[name] for name in ORGANS}
    masks["target"] = ndimage.binary_dilation(masks["urinary_bladder"], iterations=2)
    for name, mask in masks.items():
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(phantom.ct)
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return phantom


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    """Five train and three validation phantom patients in split folders (pt_N, as OpenKBP names them)."""
    root = tmp_path_factory.mktemp("clinic")
    phantoms = {}
    for split, numbers in (("train", (1, 2, 3, 10, 11)), ("validation", (20, 21, 22))):
        for n in numbers:
            phantoms[f"{split}/pt_{n}"] = write_patient(root / "hn" / split / f"pt_{n}", 300 + n)
    return root, phantoms


@pytest.fixture(scope="module")
def clinic_data(clinic):
    """The clinic's four first train patients, a second scan of one of them (another volume, same patient)
    and all three validation patients, prepared."""
    root, phantoms = clinic
    recipe = TrainingDataRecipe.model_validate({"patient_folders": [
        {"folder": "hn/train", "licence": "synthetic", "count": 4, "structures": STRUCTURES, "crops": 2},
        {"folder": "hn/validation", "split": "validation", "licence": "synthetic", "structures": ORGANS}]})
    items = recipe.items(root)
    again = items[0].volume()
    items.append(Volume("second scan", again.source, again.licence, again.ct, again.labels, again.names,
                        patient=again.patient, crops=2))
    return load_training_data(prepare_training_data(items, root / "clinic.safetensors", workers=2))


def test_patient_folders_choose_patients_by_count_or_seed(clinic):
    root, _ = clinic
    first = PatientFolders(folder="hn/train", licence="synthetic", count=3).patients(root)
    assert [p.patient for p in first] == ["hn/train/pt_1", "hn/train/pt_2", "hn/train/pt_3"]  # pt_10 after pt_3
    assert all(p.role == "train" for p in first)
    seeded = [PatientFolders(folder="hn/train", licence="synthetic", count=3, seed=5).patients(root)
              for _ in range(2)]
    assert [p.folder for p in seeded[0]] == [p.folder for p in seeded[1]] and len(seeded[0]) == 3
    every = PatientFolders(folder="hn/validation", split="validation", licence="synthetic").patients(root)
    assert len(every) == 3 and {p.role for p in every} == {"validation_split"}


def test_masks_merge_into_one_label_map_with_the_first_listed_structure_winning(clinic):
    root, phantoms = clinic
    phantom = phantoms["train/pt_2"]
    names, label_map = merged_masks(root / "hn" / "train" / "pt_2", STRUCTURES, phantom.ct)
    merged, truth = sitk.GetArrayFromImage(label_map), sitk.GetArrayFromImage(phantom.labels)
    assert names == {name: i + 1 for i, name in enumerate(STRUCTURES[:5])}  # not_contoured has no file
    for name in ORGANS:
        assert np.array_equal(merged == names[name], truth == phantom.names[name]), name
    bladder = truth == phantom.names["urinary_bladder"]
    target = ndimage.binary_dilation(bladder, iterations=2)
    organs = np.isin(truth, [phantom.names[n] for n in ORGANS])
    assert np.array_equal(merged == names["target"], target & ~organs)
    assert label_map.GetSpacing() == phantom.ct.GetSpacing() and label_map.GetOrigin() == phantom.ct.GetOrigin()


def test_training_episodes_take_support_and_query_from_different_patients(clinic_data):
    data = clinic_data
    patient = [v["patient"] for v in data.volumes]
    assert patient.count("hn/train/pt_1") == 2  # two volumes of one patient: the same-patient pair is there
    sampler = TaskSampler(data, set(), seed=8)
    train_volumes = [i for i, v in enumerate(data.volumes) if v["role"] == "train"]
    crossed = 0
    for _ in range(300):
        _, _, _, _, task = sampler.episode(3)
        elsewhere = [v for v in train_volumes
                     if patient[v] != patient[task.query_volume] and sampler.rows_in(task, v).size]
        if elsewhere:  # the cross-patient kind: another patient has the task
            assert patient[task.support_volume] != patient[task.query_volume], task
            crossed += 1
    assert crossed >= 250


def test_validation_split_patients_are_validated_among_themselves_and_never_trained_on(tmp_path, clinic_data):
    split = {i for i, v in enumerate(clinic_data.volumes) if v["role"] == "validation_split"}
    assert len(split) == 3
    config = TrainConfig(steps=1, batch_size=2, support_size=3, encoder_blocks=[8, 8, 8, 8], validation_episodes=12,
                         device="cpu")
    trainer = Trainer(clinic_data, tmp_path / "run", config)
    assert not np.isin(trainer.sampler.data.volume, list(split)).any()
    assert set(trainer.validation) == {"validation_patients"}
    patient = [v["patient"] for v in clinic_data.volumes]
    for _, _, _, _, task in trainer.validation["validation_patients"]:
        assert task.query_volume in split and task.support_volume in split
        assert patient[task.query_volume] != patient[task.support_volume]
        assert set(task.names) <= set(ORGANS)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(steps=30, batch_size=3, support_size=3, learning_rate=3e-3, warmup_steps=5, low_res_steps=20,
                       low_res_size=32, encoder_blocks=[8, 8, 8, 8], validate_every=10, validation_episodes=6,
                       checkpoint_every=10, device="cpu", **kw)


def test_a_run_stopped_by_its_time_budget_resumes_to_the_same_weights(tmp_path, clinic_data):
    """A working session ends on --max-seconds; the next one continues from the checkpoint and ends where one
    uninterrupted run ends: same steps, same log length, same weights."""
    whole = Trainer(clinic_data, tmp_path / "whole", tiny())
    whole.run(progress=False)
    session = Trainer(clinic_data, tmp_path / "sessions", tiny(max_seconds=0.3))
    session.run(progress=False)
    stopped = session.step
    assert 0 < stopped < 30
    resumed = Trainer(clinic_data, tmp_path / "sessions", tiny())
    assert resumed.resume() and resumed.step == stopped
    resumed.run(progress=False)
    assert resumed.step == whole.step == 30
    rows = (tmp_path / "sessions" / "training_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(s) for s in range(1, 31)]
    for key, value in whole.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[key], atol=1e-6), key


def test_a_recipe_naming_a_missing_patients_folder_is_refused_in_one_line(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "recipe.json").write_text('{"patient_folders": [{"folder": "nowhere/train", "licence": "x"}]}')
    assert main(["train", "--recipe", str(models / "recipe.json"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere/train" in err and "not there" in err


@pytest.mark.parametrize("name", ["training_data_openkbp.json", "training_data_openkbp-gpu.json",
                                  "training_data_openkbp-gpu-lite.json"])
def test_the_shipped_clinic_recipes_train_on_train_patients_and_validate_on_validation_patients(name):
    recipe, root = load_recipe(ROOT / "models" / name)
    assert root == ROOT
    splits = {folders.split: folders.folder.as_posix() for folders in recipe.patient_folders}
    assert splits == {"train": "../shared/data/openkbp_hn/train", "validation": "../shared/data/openkbp_hn/validation"}
    chest = next(c for c in recipe.cases if c.patient == "chest_abdomen_ct_example")
    assert not {"bone", "enhanced_vessels"} & set(chest.hu_tasks)  # they would trace its held-back aorta
