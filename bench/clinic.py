"""The clinic benchmark: what a clinic can expect from its own patients as its support sets grow.

Many patients on one protocol, contoured by one team: the OpenKBP head-and-neck planning CTs
(../shared/data/openkbp_hn, read its SOURCE.md). Support sets are built through the product's own
`build_support_set` (what `autocontour support build` runs) from n train patients (a fixed-seed order of the
train patients that have every structure asked for, so the sets are nested: the 3 include the 1, the 10
include the 3), and validation patients are segmented through `Segmenter.segment` (what `autocontour segment`
runs) with those sets, in three modes:

- network: the network alone (`registration=False`);
- registration: the registration prior alone (`prior_weight=1.0`: the chosen source cases registered and
  fused, thresholded as the product thresholds it; nothing drawn where no prior could be made);
- hybrid: the product's default (the prior gives the window and levels and is fused with the network).

Per structure: Dice, surface Dice at the structure's tolerance and HD95 (`autocontour.evaluation.metrics`),
and seconds per structure (the wall time of one `segment` call for all structures, divided by their number;
each call registers afresh, so every mode pays for what it uses). Train patients only build sets,
validation patients are only segmented and scored; the held-back split is never read.

    python bench/clinic.py [--n 1,3,10,30] [--validation 33] [--modes network,registration,hybrid]
                           [--structures brainstem,spinal_cord,...] [--chosen-cases K] [--seed 0] [--data DIR]
                           [--work DIR] [--json-out JSON]

Results go to --json-out after every segmentation (a rerun with the same file skips what is there), and the
table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cross_patient import evaluate, tolerance  # noqa: E402  (bench helper: Dice, NSD, HD95 on a bounding box)

from autocontour.options import SegmentOptions  # noqa: E402
from autocontour.pipeline import Segmenter  # noqa: E402
from autocontour.support import choice  # noqa: E402
from autocontour.support.build import build_support_set  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "openkbp_hn"  # --data for a checkout elsewhere
STRUCTURES = ("brainstem", "spinal_cord", "parotid_left", "parotid_right", "mandible")
MODES = {"network": {"registration": False}, "registration": {"prior_weight": 1.0}, "hybrid": {}}


def train_order(structures: tuple[str, ...], seed: int) -> list[str]:
    """Train patients that have every structure, in a fixed random order: the first n build the n-case sets."""
    listed = json.loads((DATA / "patients.json").read_text())
    eligible = sorted(p["patient"] for p in listed
                      if p["split"] == "train" and all(s in p["structures"] for s in structures))
    return [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]


def build_sets(patients: list[str], structures: tuple[str, ...], out: Path) -> float:
    """One support set per structure from these train patients, as `autocontour support build` makes them;
    returns the seconds it took (nothing is rebuilt when the folder is complete)."""
    started = time.perf_counter()
    for structure in structures:
        folder = out / structure
        if (folder / "manifest.json").is_file():
            continue
        cases = [(DATA / "train" / p / "ct.nii.gz", DATA / "train" / p / f"{structure}.nii.gz") for p in patients]
        build_support_set(structure, structure, cases, folder, preview=False,
                          source=f"OpenKBP train patients {', '.join(patients)}")
    return time.perf_counter() - started


def segment_patient(segmenter: Segmenter, patient: Path, structures: tuple[str, ...], mode: str) -> dict:
    """One validation patient in one mode: per structure metrics and the seconds per structure."""
    segmenter._registrations.clear()  # each mode pays for its own registrations: honest seconds
    started = time.perf_counter()
    result = segmenter.segment(patient / "ct.nii.gz", None,
                               SegmentOptions(structures=list(structures), preview=False, **MODES[mode]))
    seconds = time.perf_counter() - started
    ct = sitk.ReadImage(str(patient / "ct.nii.gz"))
    spacing = ct.GetSpacing()[::-1]
    scores = {}
    for structure in structures:
        truth_file = patient / f"{structure}.nii.gz"
        if not truth_file.is_file():
            continue
        drawn = sitk.GetArrayFromImage(sitk.DICOMOrient(result.masks[structure], "LPS")) > 0
        entry = result.summary.structures[structure]
        if mode == "registration" and entry.registration_prior is None:
            drawn[:] = False  # no prior could be made: the prior alone draws nothing
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_file))) > 0
        scores[structure] = evaluate(drawn, truth, spacing, tolerance(structure)) | {
            "registered": (entry.registration_prior or {}).get("source_cases", []),
            "confidence": entry.confidence, "network_confidence": entry.network_confidence,
            "estimated_surface_dice": entry.estimated_surface_dice}
    return {"seconds_per_structure": round(seconds / len(structures), 2), "structures": scores}


def mean_of(records: list[dict], structures: tuple[str, ...], key: str) -> float | None:
    values = [r["structures"][s][key] for r in records for s in structures
              if s in r["structures"] and r["structures"][s][key] is not None]
    return float(np.mean(values)) if values else None


def table(results: dict, structures: tuple[str, ...], ns: list[int]) -> str:
    """Markdown: per n and mode, mean Dice per structure, then mean Dice, NSD, HD95 and s/structure."""
    head = ["n", "mode", "patients", *structures, "mean Dice", "mean NSD", "mean HD95 mm", "s/structure"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for n in ns:
        for mode in MODES:
            records = [r for key, r in results.items() if key.startswith(f"n{n}/{mode}/")]
            if not records:
                continue
            cells = [str(n), mode, str(len(records))]
            cells += [_fmt(mean_of(records, (s,), "dice")) for s in structures]
            cells += [_fmt(mean_of(records, structures, k), d) for k, d in (("dice", 3), ("nsd", 3), ("hd95", 1))]
            cells.append(f"{np.mean([r['seconds_per_structure'] for r in records]):.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1,3,10,30", help="train patients per support set (nested)")
    parser.add_argument("--validation", type=int, default=None, help="first N validation patients (default all)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    parser.add_argument("--chosen-cases", type=int, default=choice.CHOSEN_CASES,
                        help="source cases registered per scan (autocontour.support.choice.CHOSEN_CASES)")
    parser.add_argument("--data", type=Path, default=DATA, help="the OpenKBP folder (train/, validation/)")
    parser.add_argument("--seed", type=int, default=0, help="order of the train patients")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autocontour-clinic"),
                        help="support sets are built here (kept: a rerun reuses them)")
    parser.add_argument("--json-out", type=Path, default=None, help="default: WORK/results.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    global DATA
    DATA = args.data
    choice.CHOSEN_CASES = args.chosen_cases
    structures = tuple(args.structures.split(","))
    ns = [int(n) for n in args.n.split(",")]
    modes = args.modes.split(",")
    order = train_order(structures, args.seed)
    out = args.json_out or args.work / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    segmenters = {}
    for n in ns:
        folder = args.work / f"sets-n{n}"
        seconds = build_sets(order[:n], structures, folder)
        print(f"n = {n}: sets from {', '.join(order[:n])} ({seconds:.0f} s)", flush=True)
        segmenters[n] = Segmenter(device="cpu", support_dirs=[folder], shipped_support=False)
    validation = sorted((DATA / "validation").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    for patient in validation[:args.validation]:
        for n in ns:
            for mode in modes:
                key = f"n{n}/{mode}/{patient.name}"
                if key in results:
                    continue
                results[key] = segment_patient(segmenters[n], patient, structures, mode)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
                print(key, f"{mean_of([results[key]], structures, 'dice'):.3f}",
                      results[key]["seconds_per_structure"], "s/structure", flush=True)
    print(table(results, structures, ns))


if __name__ == "__main__":
    main()
