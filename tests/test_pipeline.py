"""segment() end to end: geometry, orientation invariance, summary, CLI behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from badinputs import bad_inputs
from conftest import EXAMPLE_CT, ROOT, write_phantom

from autocontour.cli import main
from autocontour.config import Settings
from autocontour.errors import NoSupportSetError, WeightsError
from autocontour.options import SegmentOptions
from autocontour.pipeline import Segmenter
from autocontour.pipeline.calibration import ConfidenceCalibration
from autocontour.pipeline.library import Library


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            and a.GetDirection() == b.GetDirection())


@pytest.fixture(scope="module")
def phantom_segmenter(small_weights, phantom_support_dir):
    return Segmenter(weights=small_weights, device="cpu", support_dirs=[phantom_support_dir], shipped_support=False)


def test_phantom_end_to_end(tmp_path, phantom_segmenter):
    ct_path, _ = write_phantom(tmp_path / "new", seed=21, size=(70, 60, 30), spacing=(5.0, 5.0, 5.0),
                               orientation="RAI")
    ct = sitk.ReadImage(str(ct_path))
    seen = []
    phantom_segmenter.segment(ct_path, tmp_path / "out", SegmentOptions(structures="bladder, CTVn", support_size=4,
                                                                        ensemble=2, probabilities=True),
                              progress=lambda *a: seen.append(a))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["structures"]) == {"bladder", "ctvn"}
    assert "draft" in summary["disclaimer"].lower() and summary["input"]["orientation"] == "RAI"
    for name in ("bladder", "ctvn"):
        mask = sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz"))
        prob = sitk.ReadImage(str(tmp_path / "out" / f"{name}_prob.nii.gz"))
        assert same_grid(mask, ct) and same_grid(prob, ct)
        assert mask.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
        s = summary["structures"][name]
        assert s["support_set"]["id"].startswith(name) and s["ensemble"] == 2 and s["support_size"] == 4
        assert s["voxels"] == int(sitk.GetArrayFromImage(mask).sum())
        assert s["confidence"] is None or 0 <= s["confidence"] <= 1
        assert set(s["postprocessing"]) == {"threshold", "holes_filled", "overlap_rules", "components_removed"}
    assert summary["model"]["name"] == "test-small" and len(summary["model"]["sha256"]) == 64
    assert (tmp_path / "out" / "preview.png").stat().st_size > 20_000
    phases = list(dict.fromkeys(phase for phase, *_ in seen))  # every stage named, in order, passes with counts
    stages = ["reading", "preprocessing", "registration", "fine", "post-processing", "writing outputs"]
    assert [p for p in phases if p in stages] == stages and set(phases) <= {*stages, "coarse"}
    assert all(total for phase, _, total in seen if phase == "fine")
    assert "ct.nii.gz" not in json.dumps(summary)  # no file names (they can carry patient identifiers)
    assert summary["timings_s"]["total"] > 0


def test_ras_and_lps_copies_give_the_same_masks(tmp_path, small_weights):
    """The example CT is RAS; an LPS copy of the same scan must give the same result in physical space."""
    ras = sitk.ReadImage(str(EXAMPLE_CT))
    lps = sitk.DICOMOrient(ras, "LPS")
    assert lps.GetDirection() != ras.GetDirection()
    segmenter = Segmenter(weights=small_weights, device="cpu")
    options = SegmentOptions(structures="bladder,anorectum", support_size=4, probabilities=True)
    a = segmenter.segment(ras, options=options)
    b = segmenter.segment(lps, options=options)
    for name in ("bladder", "anorectum"):
        assert same_grid(a.masks[name], ras) and same_grid(b.masks[name], lps)
        b_on_a = sitk.DICOMOrient(b.probabilities[name], "RAS")
        assert np.abs(sitk.GetArrayFromImage(b_on_a) - sitk.GetArrayFromImage(a.probabilities[name])).max() < 1e-6
        prob = sitk.GetArrayFromImage(a.probabilities[name])
        assert prob.max() > 0.01  # the comparison is not between two empty maps
        mask_b_on_a = sitk.GetArrayFromImage(sitk.DICOMOrient(b.masks[name], "RAS"))
        assert np.array_equal(mask_b_on_a, sitk.GetArrayFromImage(a.masks[name]))
    assert a.summary.input.fingerprint == b.summary.input.fingerprint  # recognised as one scan
    assert any("source case" in w for w in b.summary.warnings)  # so leave-slice-out applies to both


def test_missing_weights_are_explained(tmp_path):
    with pytest.raises(WeightsError, match="does not run with random weights"):
        Segmenter(settings=Settings(home=tmp_path))


def test_an_api_only_library_describes_the_model_and_cannot_segment(small_weights, phantom_support_dir):
    describer = Library(weights=small_weights, support_dirs=[phantom_support_dir], shipped_support=False)
    assert describer.describe_model()["precision"] == "set by each worker" and describer.supports
    assert not hasattr(describer, "segment")  # segmenting is a Segmenter's, with its network


def test_structures_without_support_explain_how_to_add_one(phantom_segmenter):
    with pytest.raises(NoSupportSetError, match="autocontour support build ctvp"):
        phantom_segmenter.segment(EXAMPLE_CT, options={"structures": "bladder,ctvp"})


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, small_weights):
    corpus = bad_inputs(tmp_path / "bad")
    for name, (path, words) in corpus.items():
        code = main(["segment", str(path), "--out", str(tmp_path / "o"), "--weights", str(small_weights), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.count("\n") == 1 and words.lower() in err.lower(), (name, err)
    for argv, words in ((["segment", str(EXAMPLE_CT), "--out", str(tmp_path / "o"), "--structures", "liver"], "liver"),
                        (["segment", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o")], "not found"),
                        (["segment", str(EXAMPLE_CT), "--out", str(tmp_path / "o"), "--weights",
                          str(tmp_path / "nope.pt")], "not found"),
                        (["segment", str(EXAMPLE_CT), "--out", str(tmp_path / "o"), "--threshold", "1.5",
                          "--weights", str(small_weights)], "threshold")):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, (argv, err)
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--out", "x"])
    assert exc.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_support_build_and_segment_with_a_clinic_set(tmp_path, capsys, small_weights, phantom_cases):
    args = ["support", "build", "bladder", "--label", "104", "--size", "10", "--out", str(tmp_path / "clinic" / "b")]
    for ct, mask in phantom_cases:
        args += ["--case", str(ct), str(mask)]
    assert main(args) == 0
    assert "bladder-" in capsys.readouterr().out
    code = main(["segment", str(phantom_cases[0][0]), "--out", str(tmp_path / "out"), "--weights", str(small_weights),
                 "--structures", "bladder", "--support-dir", str(tmp_path / "clinic"), "--support-size", "3",
                 "--precision", "float32", "--quiet", "--no-preview"])
    out = capsys.readouterr().out
    assert code == 0 and "DRAFT" in out and "Bladder" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["structures"]["bladder"]["support_set"]["source_cases"] == 2
    assert any("source case" in w for w in summary["warnings"])  # leave-slice-out was applied
    assert not (tmp_path / "out" / "preview.png").exists()
    assert summary["model"]["precision"] == "float32" and "caller" in summary["model"]["precision_note"]


def test_help_texts_name_the_draft_status(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "drafts for clinical review" in capsys.readouterr().out
    assert (ROOT / "support_sets" / "recipes" / "ctvn.json").is_file()


def test_weak_evidence_lowers_the_confidence_and_says_why(tmp_path, phantom_segmenter):
    """Searching every body slice (no skeleton match placed the structure) is weak evidence: the confidence is
    the network's own times the discount, and the summary names the reason."""
    ct_path, _ = write_phantom(tmp_path / "new", seed=21, size=(70, 60, 30), spacing=(5.0, 5.0, 5.0))
    options = {"structures": "bladder", "support_size": 4}
    placed = phantom_segmenter.segment(ct_path, options=SegmentOptions(**options)).summary.structures["bladder"]
    searched = phantom_segmenter.segment(ct_path, options=SegmentOptions(**options, axial_search="all"))
    unplaced = searched.summary.structures["bladder"]
    assert unplaced.network_confidence is not None and unplaced.confidence is not None
    assert any("every body slice was searched" in reason for reason in unplaced.confidence_discounts)
    assert not any("every body slice" in reason for reason in placed.confidence_discounts)
    factors = [float(reason.rsplit("(x", 1)[1].rstrip(")")) for reason in unplaced.confidence_discounts]
    assert unplaced.confidence == pytest.approx(unplaced.network_confidence * float(np.prod(factors)), abs=2e-3)
    assert unplaced.confidence < unplaced.network_confidence


def test_the_summary_estimates_surface_dice_only_for_weights_it_was_fitted_for(tmp_path, phantom_segmenter):
    ct_path, _ = write_phantom(tmp_path / "new", seed=21, size=(70, 60, 30), spacing=(5.0, 5.0, 5.0))
    options = SegmentOptions(structures="bladder", support_size=4)
    unfitted = phantom_segmenter.segment(ct_path, options=options).summary.structures["bladder"]
    assert unfitted.confidence is not None and unfitted.estimated_surface_dice is None
    calibration = ConfidenceCalibration.fit([0.2, 0.5, 0.9], [0.3, 0.6, 0.8], phantom_segmenter.model.card.sha256,
                                            "synthetic")
    phantom_segmenter.library.calibration = calibration
    try:
        fitted = phantom_segmenter.segment(ct_path, options=options).summary.structures["bladder"]
    finally:
        phantom_segmenter.library.calibration = None
    assert fitted.estimated_surface_dice == calibration.estimate(fitted.confidence)
