"""The confidence calibration: a monotone map fitted per checkpoint, and nothing for other weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT

from autocontour.config import Settings
from autocontour.model.weights import sha256_of
from autocontour.pipeline.calibration import SHIPPED, ConfidenceCalibration, load_calibration


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


def test_the_shipped_calibration_belongs_to_the_shipped_weights_only():
    shipped = json.loads(SHIPPED.read_text())
    assert shipped["weights_sha256"] == sha256_of(Settings().default_weights)
    assert load_calibration(shipped["weights_sha256"]) is not None
    assert load_calibration("0" * 64) is None
    assert "training data" in shipped["fitted_on"]
    assert (ROOT / "bench" / "cross_patient_training_results.json").is_file()  # what it was fitted on
