"""Every metric matches DeepMind's surface-distance numbers within the fixtures' tolerances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA

from autocontour.evaluation.metrics import compute_metrics, metric_keys

FIXTURES = DATA / "metrics"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
TOLERANCES = {"dice": (1e-9, 1e-6), "jaccard": (1e-9, 1e-6), "precision": (1e-9, 1e-6), "recall": (1e-9, 1e-6),
              "rvd": (1e-9, 1e-6), "volume_ref_ml": (1e-9, 1e-6), "volume_pred_ml": (1e-9, 1e-6)}


def tolerance(key: str) -> tuple[float, float]:
    if key.startswith("nsd_"):
        return 1e-5, 0.0
    return TOLERANCES.get(key, (1e-4, 1e-6))


@pytest.mark.parametrize("case", sorted(EXPECTED["cases"]))
def test_matches_deepmind(case):
    spec = EXPECTED["cases"][case]
    ref_image = sitk.ReadImage(str(FIXTURES / spec["files"]["ref"]))
    pred_image = sitk.ReadImage(str(FIXTURES / spec["files"]["pred"]))
    ref, pred = sitk.GetArrayFromImage(ref_image), sitk.GetArrayFromImage(pred_image)
    spacing = ref_image.GetSpacing()[::-1]  # array axes are (z, y, x)
    metrics, flags = compute_metrics(pred, ref, spacing, tolerances_mm=(1, 2, 3, 5))
    assert list(metrics) == EXPECTED["metric_keys"]
    for key, expected in spec["metrics"].items():
        got = metrics[key]
        if expected is None:
            assert got is None, (key, got)
            continue
        assert got is not None and math.isfinite(got), (key, got)
        absolute, relative = tolerance(key)
        assert abs(got - expected) <= absolute + relative * abs(expected), (case, key, got, expected)
    assert bool(flags) == any(spec["metrics"][k] is None for k in ("hd100_mm", "assd_mm"))


def test_reference_empty_prediction_not():
    pred = np.zeros((5, 6, 7), dtype=bool)
    pred[2, 3, 3] = True
    metrics, flags = compute_metrics(pred, np.zeros_like(pred), (2.0, 1.0, 1.0))
    assert metrics["dice"] == 0 and metrics["precision"] == 0 and metrics["recall"] is None and metrics["rvd"] is None
    assert metrics["hd95_mm"] is None and metrics["nsd_2mm"] == 0 and "reference empty" in flags[0]
    assert json.dumps(metrics)  # no NaN or inf can reach JSON


def test_axis_order_matters_and_spacing_is_used():
    ref = np.zeros((10, 20, 20), dtype=bool)
    ref[3:7, 5:15, 5:15] = True
    pred = np.roll(ref, 1, axis=2)
    m, _ = compute_metrics(pred, ref, (3.0, 0.5, 0.5))
    assert m["hd100_mm"] == pytest.approx(0.5)
    m, _ = compute_metrics(np.roll(ref, 1, axis=0), ref, (3.0, 0.5, 0.5))
    assert m["hd100_mm"] == pytest.approx(3.0)
    assert list(m) == metric_keys()
