"""Fit a confidence calibration on benchmark results, and report how confidence ranks and estimates quality.

    python bench/calibrate_confidence.py fit RESULTS.json [...] --out FILE
    python bench/calibrate_confidence.py check RESULTS.json [...] [--out FILE]   # rank correlation and errors

Both read the JSON that bench/cross_patient.py (--json-out) and bench/clinic.py (--json-out) write: every
structure result holding `confidence` and `nsd` (surface Dice at the structure's tolerance) is a sample, except
structures absent from the reference; each query patient is a group. Fit on training and validation data only
(virtual patients and phantoms, a clinic's own validation patients), never on data held back for evaluation.
`fit` writes the calibration only where, fitted on all groups but one, it estimates the left-out group's
surface Dice better than the confidence itself does (leave one patient out); otherwise it says so and exits 1.
A clinic fits its own from its own cases and points AUTOCONTOUR_CONFIDENCE_CALIBRATION at it.
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
from autocontour.pipeline.calibration import (  # noqa: E402
    ConfidenceCalibration,
    held_out_errors,
    load_calibration,
)

BINS = 5


def samples(node: object) -> list[dict]:
    """Every structure result below `node` with a confidence and a surface Dice."""
    if not isinstance(node, dict):
        return []
    if "nsd" in node and node.get("confidence") is not None and node.get("present", True):
        return [node]
    return [found for value in node.values() for found in samples(value)]


def grouped(paths: list[Path]) -> dict[str, list[dict]]:
    """Samples by query patient: a cross-patient case, or a clinic patient whatever its set size and mode."""
    groups: dict[str, list[dict]] = {}
    for path in paths:
        for key, value in json.loads(path.read_text()).items():
            groups.setdefault(f"{path.stem}:{key.rsplit('/', 1)[-1]}", []).extend(samples(value))
    return {name: rows for name, rows in groups.items() if rows}


def fit(paths: list[Path], sha: str, out: Path) -> int:
    groups = grouped(paths)
    if len(groups) < 2:
        print(f"not written: {len(groups)} patient(s) with confidences; leaving one out needs at least 2")
        return 1
    held_out, bare = held_out_errors({n: [(r["confidence"], r["nsd"]) for r in rows] for n, rows in groups.items()})
    print(f"{len(groups)} patients: leave-one-patient-out mean absolute error {held_out:.3f} calibrated, "
          f"{bare:.3f} for the confidence itself")
    if held_out >= bare:
        print("not written: the calibration does not estimate left-out patients better than the confidence")
        return 1
    rows = [r for group in groups.values() for r in group]
    fitted = ConfidenceCalibration.fit([r["confidence"] for r in rows], [r["nsd"] for r in rows], sha,
                                       ", ".join(p.name for p in paths))
    fitted.held_out_error, fitted.confidence_error = round(held_out, 4), round(bare, 4)
    out.write_text(fitted.model_dump_json(indent=1) + "\n")
    print(f"{out}: {fitted.samples} samples")
    return 0


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
    parser.add_argument("--out", type=Path, default=None,
                        help="fit: the calibration file to write (required); check: a calibration to check too")
    args = parser.parse_args()
    sha = sha256_of(args.weights)
    if args.action == "fit":
        if args.out is None:
            parser.error("fit needs --out FILE")
        sys.exit(fit(args.results, sha, args.out))
    calibration = load_calibration(sha, args.out)
    print("| results | n | value | rho vs Dice | rho vs surface Dice | mean abs. error vs surface Dice | ECE |")
    print("|---|---|---|---|---|---|---|")
    for path in args.results:
        print("\n".join(report(path.stem, samples(json.loads(path.read_text())), calibration)))


if __name__ == "__main__":
    main()
