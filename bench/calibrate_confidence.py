"""Fit the confidence calibration on training-data benchmark results, and check it on others.

    python bench/calibrate_confidence.py fit /tmp/cross_patient.json     # writes models/confidence_calibration.json
    python bench/calibrate_confidence.py check /tmp/clinic.json [...]    # rank correlation and calibration error

Both read the JSON that bench/cross_patient.py (--json-out) and bench/clinic.py (--json-out) write: every
structure result holding `confidence` and `nsd` (surface Dice at the structure's tolerance) is a sample, except
structures absent from the reference. Fit only on results whose queries are training data (the virtual
patients, phantoms and the DICOM example of bench/cross_patient.py); check on patients the weights never saw
(the OpenKBP validation patients of bench/clinic.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocontour.config import Settings  # noqa: E402
from autocontour.model.weights import sha256_of  # noqa: E402
from autocontour.pipeline.calibration import SHIPPED, ConfidenceCalibration, load_calibration  # noqa: E402

BINS = 5


def samples(node: object) -> list[dict]:
    """Every structure result below `node` with a confidence and a surface Dice."""
    if not isinstance(node, dict):
        return []
    if "nsd" in node and node.get("confidence") is not None and node.get("present", True):
        return [node]
    return [found for value in node.values() for found in samples(value)]


def calibration_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Expected calibration error: |mean estimate - mean truth| over equal-count bins, weighted by their size."""
    order = np.argsort(estimate, kind="stable")
    bins = np.array_split(order, min(BINS, len(order)))
    return float(sum(len(b) * abs(estimate[b].mean() - truth[b].mean()) for b in bins) / len(order))


def report(name: str, rows: list[dict], calibration: ConfidenceCalibration | None) -> list[str]:
    confidence = np.array([r["confidence"] for r in rows], float)
    network = np.array([r.get("network_confidence", r["confidence"]) for r in rows], float)
    dice, nsd = np.array([r["dice"] for r in rows], float), np.array([r["nsd"] for r in rows], float)
    lines = []
    estimates = {"network confidence": network, "confidence": confidence}
    if calibration is not None:
        estimates["estimated surface Dice"] = np.array([calibration.estimate(c) for c in confidence], float)
    for label, value in estimates.items():
        rho_dice, rho_nsd = stats.spearmanr(value, dice).statistic, stats.spearmanr(value, nsd).statistic
        lines.append(f"| {name} | {len(rows)} | {label} | {rho_dice:.3f} | {rho_nsd:.3f} | "
                     f"{np.mean(np.abs(value - nsd)):.3f} | {calibration_error(value, nsd):.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["fit", "check"])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--weights", type=Path, default=Settings().default_weights,
                        help="the checkpoint the results were made with (default: the shipped weights)")
    parser.add_argument("--out", type=Path, default=SHIPPED)
    args = parser.parse_args()
    sha = sha256_of(args.weights)
    if args.action == "fit":
        rows = [r for path in args.results for r in samples(json.loads(path.read_text()))]
        fitted = ConfidenceCalibration.fit([r["confidence"] for r in rows], [r["nsd"] for r in rows], sha,
                                           "bench/cross_patient.py results on training data: "
                                           + ", ".join(p.name for p in args.results))
        args.out.write_text(fitted.model_dump_json(indent=1) + "\n")
        print(f"{args.out}: {fitted.samples} samples, fitted mean absolute error {fitted.mean_abs_error:.3f}")
        return
    calibration = load_calibration(sha, args.out)
    print("| results | n | value | rho vs Dice | rho vs surface Dice | mean abs. error vs surface Dice | ECE |")
    print("|---|---|---|---|---|---|---|")
    for path in args.results:
        print("\n".join(report(path.stem, samples(json.loads(path.read_text())), calibration)))


if __name__ == "__main__":
    main()
