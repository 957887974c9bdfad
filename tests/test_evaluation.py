"""`autocontour evaluate` and cross-validation: pairing, grids, outputs, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA, EXAMPLE_CT, EXAMPLE_LABELS

from autocontour.cli import main
from autocontour.evaluation.metrics import metric_keys

FIXTURES = DATA / "metrics"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def test_single_pair_with_custom_tolerances(tmp_path, capsys):
    case = EXPECTED["cases"]["d_dilated_1vox"]
    code = main(["evaluate", "--pred", str(FIXTURES / case["files"]["pred"]),
                 "--ref", str(FIXTURES / case["files"]["ref"]),
                 "--structures", "blob", "--tolerance-mm", "1,2,3,5", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    (record,) = report["records"]
    assert record["structure"] == "blob" and list(record["metrics"]) == EXPECTED["metric_keys"]
    assert record["metrics"]["nsd_2mm"] == pytest.approx(case["metrics"]["nsd_2mm"], abs=1e-5)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows[0]["structure"] == "blob" and float(rows[0]["dice"]) == pytest.approx(case["metrics"]["dice"])
    assert "| blob |" in (tmp_path / "metrics.md").read_text()
    assert (tmp_path / "plots" / "hd95_mm.png").stat().st_size > 5000


def test_per_structure_tolerances(tmp_path, capsys):
    case = EXPECTED["cases"]["d_dilated_1vox"]
    for folder, key in (("pred", "pred"), ("ref", "ref")):
        (tmp_path / folder).mkdir()
        for structure in ("bladder", "ctvn"):
            sitk.WriteImage(sitk.ReadImage(str(FIXTURES / case["files"][key])),
                            str(tmp_path / folder / f"{structure}.nii.gz"))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--structure-tolerance", "ctvn=5", "--out", str(tmp_path / "out")]) == 0
    records = {r["structure"]: r["metrics"] for r in
               json.loads((tmp_path / "out" / "metrics.json").read_text())["records"]}
    assert "nsd_5mm" not in records["bladder"] and list(records["bladder"]) == metric_keys((1, 2, 3))
    assert records["ctvn"]["nsd_5mm"] == pytest.approx(case["metrics"]["nsd_5mm"], abs=1e-5)
    rows = {r["structure"]: r for r in csv.DictReader(open(tmp_path / "out" / "metrics.csv"))}
    assert rows["bladder"]["nsd_5mm"] == "" and float(rows["ctvn"]["nsd_5mm"]) == pytest.approx(
        case["metrics"]["nsd_5mm"], abs=1e-5)
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--structure-tolerance", "ctvn", "--out", str(tmp_path / "bad")]) == 2
    assert "NAME=MM" in capsys.readouterr().err


def test_folders_pair_by_name_and_grids_are_reconciled(tmp_path):
    ref = sitk.ReadImage(str(FIXTURES / "a_identical_blob" / "ref.nii.gz"))
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred").mkdir()
    sitk.WriteImage(ref, str(tmp_path / "ref" / "bladder.nii.gz"))
    flipped = sitk.DICOMOrient(ref, "RAS")  # same voxels, another grid
    sitk.WriteImage(flipped, str(tmp_path / "pred" / "bladder.nii.gz"))
    sitk.WriteImage(flipped, str(tmp_path / "pred" / "bladder_prob.nii.gz"))  # skipped, not a mask
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"), "--out",
                 str(tmp_path / "out")]) == 0
    (record,) = json.loads((tmp_path / "out" / "metrics.json").read_text())["records"]
    assert record["metrics"]["dice"] == 1.0 and "resampled" in record["notes"][0]


def test_label_maps_pair_by_value(tmp_path):
    labels = np.zeros((8, 16, 16), dtype=np.uint8)
    labels[2:6, 2:8, 2:8] = 3
    labels[2:6, 9:14, 9:14] = 7
    ref = sitk.GetImageFromArray(labels)
    pred_arr = labels.copy()
    pred_arr[pred_arr == 7] = 0
    pred = sitk.GetImageFromArray(pred_arr)
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    sitk.WriteImage(pred, str(tmp_path / "pred.nii.gz"))
    (tmp_path / "labels.json").write_text(json.dumps({"3": "bladder", "7": "anorectum"}))
    assert main(["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--ref", str(tmp_path / "ref.nii.gz"),
                 "--out", str(tmp_path / "out")]) == 0
    records = {r["structure"]: r for r in json.loads((tmp_path / "out" / "metrics.json").read_text())["records"]}
    assert records["bladder"]["metrics"]["dice"] == 1.0
    assert records["anorectum"]["metrics"]["dice"] == 0.0 and records["anorectum"]["metrics"]["hd95_mm"] is None
    assert "prediction empty" in records["anorectum"]["flags"][0]


def test_missing_and_mismatched_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    for argv, words in (
        (["--pred", str(tmp_path / "nothing"), "--ref", str(tmp_path)], "prediction not found"),
        (["--pred", str(tmp_path / "pred"), "--ref", str(FIXTURES / "a_identical_blob" / "ref.nii.gz")],
         "no prediction mask"),
        (["--pred", str(FIXTURES / "a_identical_blob" / "pred.nii.gz"), "--ref", str(tmp_path)], "single reference"),
        (["--pred", str(FIXTURES / "a_identical_blob" / "pred.nii.gz"), "--ref",
          str(FIXTURES / "a_identical_blob" / "ref.nii.gz"), "--tolerance-mm", "1,x"], "tolerance"),
    ):
        code = main(["evaluate", *argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)


def test_a_ct_sent_as_a_label_map_is_refused_before_any_label_is_built(tmp_path, capsys):
    """Thousands of CT values would each become a label pair: two full-size masks apiece (7 GB seen)."""
    code = main(["evaluate", "--pred", str(EXAMPLE_CT), "--ref", str(EXAMPLE_LABELS), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is it a CT instead of a mask" in err
    assert not (tmp_path / "out").exists()


def test_crossval_on_phantoms(tmp_path, small_weights):
    from autocontour.evaluation.crossval import cross_validate

    records = cross_validate([], ["bladder"], tmp_path, weights=small_weights, phantoms=2, support_set_size=8,
                             support_size=3, device="cpu")
    assert [r["case"] for r in records] == ["phantom0", "phantom1"]
    assert all(list(r["metrics"]) == metric_keys() for r in records)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert "leave-one-case-out over 2 cases" in report["notes"][0]
    assert (tmp_path / "folds" / "phantom0" / "prediction" / "bladder.nii.gz").is_file()


def test_evaluate_a_segment_output_against_the_example_labels(tmp_path, small_weights, capsys):
    from conftest import EXAMPLE_CT, EXAMPLE_LABELS

    assert main(["segment", str(EXAMPLE_CT), "--out", str(tmp_path / "seg"), "--weights", str(small_weights),
                 "--support-size", "2", "--quiet", "--no-preview"]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "seg"), "--ref", str(EXAMPLE_LABELS), "--ct", str(EXAMPLE_CT),
                 "--out", str(tmp_path / "eval")]) == 0
    records = json.loads((tmp_path / "eval" / "metrics.json").read_text())["records"]
    assert [r["structure"] for r in records] == ["anorectum", "bladder", "ctvn"]
    bladder = next(r for r in records if r["structure"] == "bladder")
    assert 200 < bladder["metrics"]["volume_ref_ml"] < 800  # the recipe found the reference bladder
    for name in ("metrics.csv", "metrics.md", "preview.png", "plots/dice.png", "plots/nsd_2mm.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 100, name


def test_atlas_engine_copies_the_label_of_the_most_similar_support():
    from autocontour.evaluation.baseline import AtlasEngine
    from autocontour.overlap import dice

    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 30) ** 2 + (xx - 34) ** 2 < 12 ** 2).astype(np.float32)
    image = 0.2 + 0.6 * disk + 0.05 * np.sin(xx / 5.0)
    other = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    pool = np.stack([np.stack([other, np.zeros_like(disk)]), np.stack([image, disk]),
                     np.stack([image, np.zeros_like(disk)])]).astype(np.float32)
    done = []
    out = AtlasEngine().predict(np.stack([image, image]), pool, np.array([[0, 1], [0, 2]]), done.append)
    assert out.shape == (2, 64, 64) and out.dtype == np.float32 and sum(done) == 2
    assert dice(out[0] >= 0.5, disk > 0) > 0.95  # the matching support's label, registered
    assert not out[1].any()  # the best match has an empty label: nothing is drawn
