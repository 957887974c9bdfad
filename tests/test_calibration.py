"""The confidence calibration: a monotone map fitted per checkpoint, and nothing for other weights."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from autocontour.config import Settings
from autocontour.errors import OptionError
from autocontour.model.weights import sha256_of
from autocontour.pipeline.calibration import ConfidenceCalibration, held_out_errors, load_calibration
from autocontour.pipeline.library import Library


def test_the_fit_never_lowers_the_estimate_as_confidence_rises_and_pools_ties():
    rng = np.random.default_rng(0)
    confidence = np.round(rng.random(60), 1)  # many ties
    truth = np.clip(0.3 + 0.6 * confidence + rng.normal(0, 0.1, 60), 0, 1)
    fitted = ConfidenceCalibration.fit(list(confidence), list(truth), "a" * 64, "synthetic")
    assert fitted.samples == 60 and len(fitted.confidence) == len(set(confidence))
    assert np.all(np.diff(fitted.surface_dice) >= 0) and np.all(np.diff(fitted.confidence) > 0)
    # the pooled mean of each tie is what the fit starts from: where truth rises within the data, so does the fit
    assert fitted.estimate(0.9) > fitted.estimate(0.1)
    assert fitted.mean_abs_error < float(np.mean(np.abs(confidence - truth)))


def test_the_estimate_is_flat_beyond_the_fitted_range_and_none_without_a_confidence():
    fitted = ConfidenceCalibration.fit([0.4, 0.6, 0.8], [0.5, 0.7, 0.9], "a" * 64, "synthetic")
    assert fitted.estimate(0.0) == 0.5 and fitted.estimate(1.0) == 0.9
    assert fitted.estimate(0.7) == pytest.approx(0.8)
    assert fitted.estimate(None) is None


def test_a_calibration_is_read_only_for_the_weights_it_was_fitted_for(tmp_path, small_weights):
    path = tmp_path / "calibration.json"
    sha = sha256_of(small_weights)
    path.write_text(ConfidenceCalibration.fit([0.3, 0.9], [0.2, 0.8], sha, "synthetic").model_dump_json())
    assert load_calibration(sha, path) is not None
    assert load_calibration("0" * 64, path) is None  # other weights: no estimate, and a warning
    with pytest.raises(OptionError, match="not found"):
        load_calibration(sha, tmp_path / "absent.json")
    (tmp_path / "other.json").write_text('{"samples": 3}')
    with pytest.raises(OptionError, match="not a confidence calibration"):
        load_calibration(sha, tmp_path / "other.json")
    library = Library(Settings(confidence_calibration=path), weights=small_weights, shipped_support=False)
    assert library.calibration is not None and library.calibration.weights_sha256 == sha


def test_left_out_patients_show_whether_the_calibration_beats_the_confidence():
    """Within one protocol the confidence sits 0.3 above the truth: a fit on the other patients corrects that."""
    rng = np.random.default_rng(1)
    groups = {}
    for patient in range(4):
        confidence = rng.uniform(0.4, 0.95, 12)
        groups[f"pt_{patient}"] = [(c, c - 0.3 + rng.normal(0, 0.03)) for c in confidence]
    calibrated, bare = held_out_errors(groups)
    assert bare == pytest.approx(0.3, abs=0.02) and calibrated < 0.1


def test_the_fit_script_writes_nothing_where_the_calibration_does_not_help(tmp_path):
    """Two protocols whose confidences mean different things: left-out patients are estimated worse than by
    the confidence itself, so no calibration is written."""
    results = tmp_path / "results.json"
    rows = {f"n1/network/pt_{i}": {"structures": {"a": {"dice": 0.5, "nsd": truth, "confidence": conf}}}
            for i, (conf, truth) in enumerate([(0.8, 0.9), (0.8, 0.2), (0.5, 0.5)])}
    results.write_text(json.dumps(rows))
    out = tmp_path / "calibration.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate_confidence.py"), "fit", str(results),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "not written" in run.stdout and not out.exists()


def test_the_fit_script_writes_a_calibration_that_beats_the_confidence_on_left_out_patients(tmp_path):
    rng = np.random.default_rng(2)
    rows = {f"n1/network/pt_{p}": {"structures": {f"s{i}": {"dice": 0.5, "nsd": c - 0.3, "confidence": c}
                                                 for i, c in enumerate(rng.uniform(0.4, 0.95, 8))}}
            for p in range(3)}
    (tmp_path / "clinic.json").write_text(json.dumps(rows))
    out = tmp_path / "calibration.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate_confidence.py"), "fit",
                          str(tmp_path / "clinic.json"), "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    written = ConfidenceCalibration.model_validate_json(out.read_text())
    assert written.samples == 24 and written.held_out_error < written.confidence_error
    assert written.weights_sha256 == sha256_of(Settings().default_weights)
