"""An estimate of surface Dice from the structure confidence, fitted on benchmark results.

A confidence of 0.72 says nothing a physicist can act on; "about 0.8 of the contour's surface within
tolerance, as measured on this clinic's own cases" does, and its error on patients the fit never saw can be
stated. The mapping is isotonic (a higher confidence never lowers the estimate, no shape assumed) and belongs
to one checkpoint: other weights get no estimate. `bench/calibrate_confidence.py` fits it, and writes it only
where it predicts held-out patients better than the confidence read as an estimate does
(bench/RESULTS.md, "Confidence against quality").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Self

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from scipy.optimize import isotonic_regression

from autocontour.errors import OptionError

log = logging.getLogger(__name__)


class ConfidenceCalibration(BaseModel):
    """Knots of a monotone map from structure confidence to expected surface Dice at the structure's tolerance."""

    weights_sha256: str = Field(description="the checkpoint whose confidences were fitted")
    fitted_on: str = Field(description="which benchmark results, and why they count as training data")
    samples: int
    confidence: list[float] = Field(description="knots, increasing")
    surface_dice: list[float] = Field(description="expected surface Dice at each knot, non-decreasing")
    mean_abs_error: float = Field(description="on the samples it was fitted on")
    held_out_error: float | None = Field(None, description="mean absolute error, each group of samples (a "
                                                           "patient) estimated by a fit on the others")
    confidence_error: float | None = Field(None, description="the same for the confidence read as the estimate")

    @classmethod
    def fit(cls, confidence: list[float], surface_dice: list[float], weights_sha256: str,
            fitted_on: str) -> Self:
        x, y = np.asarray(confidence, float), np.asarray(surface_dice, float)
        knots, group, counts = np.unique(x, return_inverse=True, return_counts=True)  # ties pooled
        fitted = isotonic_regression(np.bincount(group, weights=y) / counts, weights=counts).x
        estimate = fitted[group]
        return cls(weights_sha256=weights_sha256, fitted_on=fitted_on, samples=len(x),
                   confidence=[float(v) for v in knots], surface_dice=[round(float(v), 4) for v in fitted],
                   mean_abs_error=round(float(np.mean(np.abs(estimate - y))), 4))

    def estimate(self, confidence: float | None) -> float | None:
        """Expected surface Dice; flat beyond the fitted range (no extrapolation)."""
        return None if confidence is None else round(self._at(confidence), 3)

    def _at(self, confidence: float) -> float:
        return float(np.interp(confidence, self.confidence, self.surface_dice))


def held_out_errors(groups: dict[str, list[tuple[float, float]]]) -> tuple[float, float]:
    """Mean absolute error of the calibration and of the bare confidence on each group of (confidence, surface
    Dice) samples, the calibration fitted on the other groups: what a patient the fit never saw can expect."""
    if len(groups) < 2:
        raise ValueError(f"leaving one patient out needs at least 2 patients, got {len(groups)}")
    calibrated, bare = [], []
    for name, samples in groups.items():
        others = [pair for other, rest in groups.items() if other != name for pair in rest]
        fitted = ConfidenceCalibration.fit([c for c, _ in others], [t for _, t in others], "", "")
        calibrated += [abs(fitted._at(c) - truth) for c, truth in samples]
        bare += [abs(c - truth) for c, truth in samples]
    return float(np.mean(calibrated)), float(np.mean(bare))


def load_calibration(weights_sha256: str, path: Path | None) -> ConfidenceCalibration | None:
    """The calibration at `path` if fitted for these weights (a warning otherwise); None without a path (the
    project ships none). A named file that is missing or not a calibration is an error."""
    if path is None:
        return None
    if not path.is_file():
        raise OptionError(f"confidence calibration not found: {path}")
    try:
        calibration = ConfidenceCalibration.model_validate_json(path.read_text())
    except ValidationError as error:
        raise OptionError(f"{path} is not a confidence calibration: {error.errors()[0]['msg']}") from None
    if calibration.weights_sha256 != weights_sha256:
        log.warning("the confidence calibration was fitted for other weights: no surface Dice is estimated")
        return None
    return calibration
