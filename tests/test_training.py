"""A short training run learns, checkpoints, resumes, and its weights segment; fine-tuning runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from autocontour.cli import main
from autocontour.model.weights import ModelCard, load_model, save_checkpoint
from autocontour.training.data import phantom_volumes, prepare_training_data
from autocontour.training.dataset import load_training_data
from autocontour.training.episodes import TaskSampler
from autocontour.training.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return prepare_training_data(phantom_volumes(3, seed=77), tmp_path_factory.mktemp("data") / "train.safetensors")


def tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=6, support_size=3, learning_rate=3e-3, warmup_steps=5,
                       low_res_steps=10_000, low_res_size=32, encoder_blocks=[8, 8, 8, 8], validate_every=20,
                       validation_episodes=6, checkpoint_every=20, heldout_structures=["sacrum"], device="cpu", **kw)


def test_episodes_never_reuse_the_query_and_respect_held_out_structures(data_file):
    data = load_training_data(data_file)
    sampler = TaskSampler(data, {"sacrum"}, seed=3)
    for _ in range(40):
        q, ql, si, sl, task = sampler.episode(4)
        assert not any(np.array_equal(q, s) for s in si)
        assert "sacrum" not in task.names
        assert si.shape == (4, 128, 128) and set(np.unique(sl)) <= {0.0, 1.0}
    held = TaskSampler(data, {"sacrum"}, seed=3, heldout_structures=True)
    assert all(held.episode(3)[4].names == ("sacrum",) for _ in range(5))


def test_empty_queries_lie_within_their_reach_of_the_structure(data_file):
    data = load_training_data(data_file)

    def negatives(reach):
        sampler = TaskSampler(data, {"sacrum"}, seed=5, negative_share=1.0, negative_reach=reach)
        gaps = []
        for _ in range(60):
            task = sampler.sample_task()
            if task.kind != "label" or task.plane != 0:
                continue
            volume = int(sampler.rng.choice(list(sampler.by_task[(task.names[0], 0)])))
            q = sampler._negative_query(task, volume)
            if q is None:
                continue
            assert not sampler.task_label(task, np.array([q])).any()
            shown = data.position[sampler.rows_in(task, volume)]
            gaps.append(max(shown.min() - data.position[q], data.position[q] - shown.max()))
        return np.array(gaps)

    near, anywhere = negatives(6), negatives(None)
    assert near.size and anywhere.size and near.min() >= 1 and near.max() <= 6
    assert anywhere.max() > 6


def test_loss_falls_checkpoint_resume_and_segment(tmp_path, data_file, phantom_support_dir, phantom_cases):
    out = tmp_path / "run"
    trainer = Trainer(load_training_data(data_file), out, tiny(60))
    trainer.run(progress=False)
    rows = list(csv.DictReader(open(out / "training_log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 60 and np.mean(losses[-15:]) < np.mean(losses[:15])
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").is_file()
    assert "val_dice_heldout_structures" in rows[0]

    resumed = Trainer(load_training_data(data_file), out, tiny(80))
    assert resumed.resume() and resumed.step == 60
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    resumed.run(progress=False)
    assert resumed.step == 80
    assert any(not torch.equal(before[k], v) for k, v in resumed.model.state_dict().items())
    assert len(list(csv.DictReader(open(out / "training_log.csv")))) == 80

    weights = out / "final.safetensors"
    resumed.export(weights, {"val": 0.0})
    code = main(["segment", str(phantom_cases[0][0]), "--out", str(tmp_path / "seg"), "--weights", str(weights),
                 "--support-dir", str(phantom_support_dir), "--no-shipped-support", "--structures", "bladder",
                 "--support-size", "3", "--quiet", "--no-preview"])
    assert code == 0
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["model"]["name"] == "autocontour-run" and summary["model"]["encoder_blocks"] == [8] * 4


def test_cli_train_and_finetune(tmp_path, phantom_cases, capsys):
    code = main(["train", "--phantoms", "2", "--out", str(tmp_path / "t"), "--steps", "4", "--batch-size", "2",
                 "--support-size", "2", "--low-res-steps", "4", "--validate-every", "2", "--checkpoint-every", "2",
                 "--device", "cpu", "--quiet"])
    assert code == 0 and (tmp_path / "t" / "final.safetensors").is_file()
    model, card = load_model(tmp_path / "t" / "final.safetensors")
    assert card.name == "autocontour-t" and "training data" in card.licence and not card.research_only
    # research-only starting weights (like the official ones): whatever is trained from them stays research-only
    research = tmp_path / "research.safetensors"
    save_checkpoint(model, research, card.model_copy(update={"name": "official", "licence": "OpenRAIL++-M",
                                                             "research_only": True, "notice": "research use only"}))
    capsys.readouterr()
    code = main(["finetune", "--from", str(research),
                 "--case", str(phantom_cases[0][0]), str(phantom_cases[0][1]),
                 "--case", str(phantom_cases[1][0]), str(phantom_cases[1][1]), "--structures", "bladder",
                 "--out", str(tmp_path / "f"), "--steps", "4", "--batch-size", "2", "--support-size", "2",
                 "--low-res-steps", "4", "--validate-every", "2", "--checkpoint-every", "2", "--device", "cpu",
                 "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.split("weights:")[0])
    assert 0 <= result["best_heldout_case_dice"] <= 1 and result["steps"] == 4
    assert (tmp_path / "f" / "best.safetensors").is_file()
    start = next(csv.DictReader(open(tmp_path / "f" / "training_log.csv")))  # the starting weights, validated
    assert start["step"] == "0" and start["loss"] == "" and 0 <= float(start["val_dice_heldout_case"]) <= 1
    _, tuned = load_model(tmp_path / "f" / "best.safetensors")
    assert tuned.research_only and tuned.notice == "research use only" and "research use only" in tuned.licence
    code = main(["finetune", "--from", str(tmp_path / "t" / "final.safetensors"), "--case", "a", "b",
                 "--structures", "bladder", "--out", str(tmp_path / "g")])
    assert code == 2


def test_training_from_a_prepared_file_needs_no_simpleitk(tmp_path, data_file):
    """The GPU machine has no SimpleITK: `autocontour train --data` must not import it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['SimpleITK'] = None; sys.modules['nibabel'] = None; sys.modules['monai'] = None\n"
            "from autocontour.cli import main\n"
            f"sys.exit(main(['train', '--data', {str(data_file)!r}, '--out', {str(tmp_path / 'gpu')!r}, '--steps', '2',"
            " '--batch-size', '2', '--support-size', '2', '--low-res-steps', '2', '--validate-every', '2',"
            " '--device', 'cpu', '--quiet']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "gpu" / "final.safetensors").is_file()


def test_weights_interpolate_blends_two_checkpoints_and_keeps_restrictions(tmp_path, capsys):
    from autocontour.model import UniverSeg

    paths = []
    for seed, research in ((1, False), (2, True)):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.safetensors"
        save_checkpoint(UniverSeg([8, 8, 8, 8]), path, ModelCard(
            name=f"w{seed}", version="1", sha256="", licence="OpenRAIL++-M" if research else "Apache-2.0",
            source="test", encoder_blocks=[8, 8, 8, 8], research_only=research,
            notice="research use only" if research else None))
        paths.append(path)
    start, end = (load_model(p)[0].state_dict() for p in paths)
    for share in (0.0, 0.25, 1.0):
        out = tmp_path / f"mix{share}.safetensors"
        assert main(["weights", "interpolate", str(paths[0]), str(paths[1]), "--share", str(share),
                     "--out", str(out)]) == 0
        model, card = load_model(out)
        for key, value in model.state_dict().items():
            assert torch.allclose(value, (1 - share) * start[key] + share * end[key], atol=1e-6)
        assert card.research_only and card.notice == "research use only"  # one input is research-only
    assert main(["weights", "interpolate", str(paths[0]), str(paths[1]), "--share", "1.5",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
