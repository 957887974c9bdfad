"""Propagation from a patient's own drawn slices against the interpolations planning systems offer.

For each structure a planner "draws" k slices (evenly spread over the
structure's axial extent, both ends included; or, with --ends-undrawn, k slices
spread strictly inside it), and the rest is filled three ways:

- network: autocontour.engine.propagation.propagate (the drawn slices are its support set);
- sdf: signed-distance shape interpolation between the drawn slices;
- mci: ITK's morphological contour interpolation (3D Slicer's "Fill between slices"; extra `bench`).

Dice, surface Dice at the structure's catalogue tolerance (2 mm by default) and
HD95 are computed on the undrawn slices only (the drawn slices are zeroed in
both masks), with seconds per propagation.

Data (labels we may use only):
- pelvis: ../shared/data/pelvis_ct_example (liver, spleen, kidneys, urinary bladder);
- chest: ../shared/data/chest_abdomen_ct_example, only labels its labels.nii.gz has (its liver, spleen,
  kidneys, aorta and stomach are held back: never loaded here, see HELD_BACK);
- openkbp: ../shared/data/openkbp_hn validation patients (--limit of them).

Kept (PropagationOptions defaults), measured 2026-12-04 with k = 3, ends drawn, bf16, openkbp --limit 3:
crop around the drawn contours (at least 32 CT voxels wide), drawn slices plus their mirror images as support,
the interpolation prior's weight chosen per structure by redrawing the inner drawn slice (auto_weight), the
next correction where the fused probability is least decided ("uncertainty": its proposed slices had Dice
0.48 against 0.80 for the mean slice; "disagreement" 0.56, "farthest" 0.74). Variants tried: prior weight
0 / 0.25 / 0.5, whole view, crop + whole view ensemble, auto weight; the table is in bench/RESULTS.md.

Run (2 cores: one k, one dataset at a time is minutes):
    PYTHONPATH=. python bench/propagation.py --k 3 --datasets pelvis openkbp --limit 3 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autocontour.catalogue import default_definition  # noqa: E402
from autocontour.engine.propagation import NEXT_RULES, PropagationOptions, next_slice, propagate  # noqa: E402
from autocontour.engine.runner import Engine  # noqa: E402
from autocontour.evaluation.interpolation import mci_interpolate, sdf_interpolate  # noqa: E402
from autocontour.evaluation.metrics import compute_metrics, dice, nsd_key  # noqa: E402
from autocontour.io import CanonicalCT, read_ct  # noqa: E402
from autocontour.model.weights import load_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
if not SHARED.exists():
    SHARED = Path("/work/shared/data")
WEIGHTS = ROOT / "models" / "autocontour-universeg-v2.safetensors"
HELD_BACK = {"liver", "spleen", "kidney_left", "kidney_right", "aorta", "stomach"}  # chest example only
STRUCTURES = {
    "pelvis": ["liver", "spleen", "kidney_left", "kidney_right", "urinary_bladder"],
    "chest": ["heart", "esophagus", "pancreas", "trachea", "spinal_cord"],
    "openkbp": ["brainstem", "spinal_cord", "parotid_left", "parotid_right", "mandible"],
}
METHODS = ("network", "sdf", "mci")


class CachedEngine:
    """The Engine, remembering its answers: variants that differ only after the network (prior weight,
    threshold, next-slice rule) reuse the same forward passes."""

    def __init__(self, engine: Engine):
        self.engine, self.cache = engine, {}
        self.saved = 0.0  # seconds the cache saved since the caller reset it: added back to a propagation's time

    def predict(self, queries: np.ndarray, pool: np.ndarray, index: np.ndarray) -> np.ndarray:
        key = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in (queries, pool, index))).hexdigest()
        if key in self.cache:
            self.saved += self.cache[key][1]
        else:
            start = time.perf_counter()
            self.cache[key] = (self.engine.predict(queries, pool, index), time.perf_counter() - start)
        return self.cache[key][0].copy()


def parse_variant(text: str) -> tuple[str, dict]:
    """"name:key=value,key=value" -> overrides of PropagationOptions (values parsed as JSON, else strings)."""
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


@dataclass
class Case:
    dataset: str
    patient: str
    ct: CanonicalCT
    masks: dict[str, np.ndarray]  # canonical (z, y, x) bool


def _label_case(dataset: str, folder: Path, names: list[str]) -> Case:
    ct = CanonicalCT(read_ct(folder / "ct.nii.gz"))
    table = {v: int(k) for k, v in json.loads((folder / "labels.json").read_text()).items()}
    if dataset == "chest" and HELD_BACK & set(names):
        raise SystemExit(f"held back in the chest example: {sorted(HELD_BACK & set(names))}")
    labels = ct.to_canonical(sitk.ReadImage(str(folder / "labels.nii.gz")))
    return Case(dataset, folder.name, ct, {n: labels == table[n] for n in names if n in table})


def _openkbp_case(folder: Path, names: list[str]) -> Case:
    ct = CanonicalCT(read_ct(folder / "ct.nii.gz"))
    masks = {n: ct.to_canonical(sitk.ReadImage(str(folder / f"{n}.nii.gz"))) > 0
             for n in names if (folder / f"{n}.nii.gz").exists()}
    return Case("openkbp", folder.name, ct, masks)


def cases(datasets: list[str], limit: int, structures: list[str] | None) -> Iterator[Case]:
    for dataset in datasets:
        names = [n for n in (structures or STRUCTURES[dataset]) if n in STRUCTURES[dataset] or structures]
        if dataset == "pelvis":
            yield _label_case(dataset, SHARED / "pelvis_ct_example", names)
        elif dataset == "chest":
            yield _label_case(dataset, SHARED / "chest_abdomen_ct_example", [n for n in names if n not in HELD_BACK])
        else:
            folders = sorted((SHARED / "openkbp_hn" / "validation").iterdir(), key=lambda p: int(p.name[3:]))
            for folder in folders[:limit]:
                yield _openkbp_case(folder, names)


def drawn_slices(mask: np.ndarray, k: int, ends: bool) -> list[int]:
    """k slices evenly spread over the structure's axial extent: ends included, or strictly inside."""
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    low, high = int(zs.min()), int(zs.max())
    if ends:
        picks = np.linspace(low, high, k) if k > 1 else np.array([(low + high) / 2])
    else:
        picks = low + (high - low) * (np.arange(k) + 1) / (k + 1)
    return sorted({int(round(z)) for z in picks})


def undrawn_metrics(pred: np.ndarray, ref: np.ndarray, drawn: list[int], spacing: tuple, tolerance: float) -> dict:
    """Dice, surface Dice and HD95 with the drawn slices zeroed in both masks, on the masks' common box."""
    pred, ref = pred.copy(), ref.copy()
    pred[drawn] = False
    ref[drawn] = False
    both = pred | ref
    if not both.any():
        return {"dice": 1.0, "nsd": 1.0, "hd95_mm": 0.0}
    box = tuple(slice(max(0, int(a.min()) - 2), int(a.max()) + 3) for a in np.nonzero(both))
    m, _ = compute_metrics(pred[box], ref[box], spacing, (tolerance,))
    return {"dice": m["dice"], "nsd": m[nsd_key(tolerance)], "hd95_mm": m["hd95_mm"]}


def next_slice_dice(result, ref: np.ndarray, drawn: list[int], spacing_yx: tuple) -> dict:
    """Per rule of NEXT_RULES, the result's Dice on the slice the rule proposes for the next correction
    (low = a good pick), beside the mean per-slice Dice over the propagated slices."""
    propagated = result.propagated_slices
    if not len(propagated):
        return {}
    interpolated = sdf_interpolate(ref, drawn, spacing_yx)  # the prior's own mask (prior > 0.5)
    picks = {rule: next_slice(rule, propagated, drawn, result.network, result.probability, interpolated)
             for rule in NEXT_RULES}
    out = {rule: dice(result.mask[z], ref[z]) for rule, z in picks.items() if z is not None}
    return out | {"mean_slice": float(np.mean([dice(result.mask[z], ref[z]) for z in propagated]))}


def run_structure(engine: CachedEngine, case: Case, name: str, k: int, ends: bool, options: PropagationOptions,
                  methods: tuple[str, ...]) -> dict:
    ref = case.masks[name]
    drawn = drawn_slices(ref, k, ends)
    spacing = case.ct.spacing_zyx
    tolerance = default_definition(name).nsd_tolerance_mm
    row: dict = {"dataset": case.dataset, "patient": case.patient, "structure": name, "k": k, "ends": ends,
                 "drawn": drawn, "slices": int(ref.any(axis=(1, 2)).sum())}
    for method in methods:
        start = time.perf_counter()
        if method == "network":
            engine.saved = 0.0
            result = propagate(engine, case.ct, ref, drawn, replace(options, ends_drawn=ends))  # type: ignore[arg-type]
            start -= engine.saved  # a cached forward costs what it cost the first time
            pred = result.mask
            row["ends_found"] = [(e.last_slice, e.reason) for e in result.ends]
            row["next_slice_dice"] = next_slice_dice(result, ref, drawn, spacing[1:])
            row["prior_weight"] = result.prior_weight
            row["network_only"] = undrawn_metrics(result.network > 0.5, ref, drawn, spacing, tolerance)["dice"]
        elif method == "sdf":
            pred = sdf_interpolate(ref, drawn, spacing[1:])
        else:
            pred = mci_interpolate(ref, drawn, spacing)
        seconds = time.perf_counter() - start
        row[method] = undrawn_metrics(pred, ref, drawn, spacing, tolerance) | {"seconds": seconds}
    return row


def _mean(rows: list[dict], method: str, key: str) -> float:
    values = [r[method][key] for r in rows if r[method][key] is not None]
    return float(np.mean(values)) if values else float("nan")


def _order(item: tuple) -> tuple:
    variant, dataset, structure, k, ends = item[0]
    return (k, not ends, dataset == "all", dataset, structure != "**mean**", structure, variant)


def table(rows: list[dict], methods: tuple[str, ...]) -> str:
    """Markdown: per (dataset, structure) means over patients, then per-dataset means, network vs best interp."""
    head = "| variant | dataset | structure | k | ends | " + " | ".join(f"{m} Dice / NSD / HD95" for m in methods)
    lines = [head + " | net - best interp | net s |", "|" + " --- |" * (len(methods) + 7)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        for dataset, structure in ((r["dataset"], r["structure"]), (r["dataset"], "**mean**"),
                                   ("all", "**mean**")):
            groups.setdefault((r["variant"], dataset, structure, r["k"], r["ends"]), []).append(r)
    for (variant, dataset, structure, k, ends), group in sorted(groups.items(), key=_order):
        cells = [f"{_mean(group, m, 'dice'):.3f} / {_mean(group, m, 'nsd'):.3f} / {_mean(group, m, 'hd95_mm'):.1f}"
                 for m in methods]
        gap = ""
        if "network" in methods and len(methods) > 1:
            best = max(_mean(group, m, "dice") for m in methods if m != "network")
            gap = f"{_mean(group, 'network', 'dice') - best:+.3f}"
        seconds = f"{_mean(group, 'network', 'seconds'):.1f}" if "network" in methods else ""
        lines.append(f"| {variant} | {dataset} | {structure} | {k} | {'yes' if ends else 'no'} | " + " | ".join(cells)
                     + f" | {gap} | {seconds} |")
    return "\n".join(lines)


def next_rule_summary(rows: list[dict]) -> str:
    """Mean Dice of the slice each rule proposes for the next correction (lower: the rule finds the worst
    slices), against the mean propagated slice."""
    keys = sorted({k for r in rows for k in r.get("next_slice_dice", {})})
    lines = ["| variant | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
    for variant in sorted({r["variant"] for r in rows}):
        found = [r["next_slice_dice"] for r in rows if r["variant"] == variant and r.get("next_slice_dice")]
        lines.append(f"| {variant} | " + " | ".join(f"{np.mean([f[k] for f in found if k in f]):.3f}"
                                                    for k in keys) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["pelvis", "chest", "openkbp"], choices=list(STRUCTURES))
    p.add_argument("--structures", nargs="+", help="only these structures")
    p.add_argument("--limit", type=int, default=3, help="openkbp validation patients")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5, 8])
    p.add_argument("--ends", choices=["drawn", "undrawn", "both"], default="both")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="checkpoint (default: the shipped weights)")
    p.add_argument("--precision", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-crop", action="store_true")
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--support-size", type=int, default=PropagationOptions.support_size)
    p.add_argument("--prior-weight", type=float, default=PropagationOptions.prior_weight)
    p.add_argument("--prior-scale-mm", type=float, default=PropagationOptions.prior_scale_mm)
    p.add_argument("--threshold", type=float, default=PropagationOptions.threshold)
    p.add_argument("--next-rule", default=PropagationOptions.next_rule)
    p.add_argument("--auto-weight", type=json.loads, default=PropagationOptions.auto_weight, help="true/false")
    p.add_argument("--variant", action="append", default=[],
                   help="name:key=value,... PropagationOptions overrides on top of the flags (repeatable)")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.weights)
    engine = CachedEngine(Engine(model, "cpu", args.precision, threads=args.threads))
    options = PropagationOptions(crop=not args.no_crop, flips=not args.no_flips, support_size=args.support_size,
                                 prior_weight=args.prior_weight, prior_scale_mm=args.prior_scale_mm,
                                 threshold=args.threshold, next_rule=args.next_rule,
                                 auto_weight=args.auto_weight)
    variants = [parse_variant(v) for v in args.variant] or [("flags", {})]
    ends = {"drawn": [True], "undrawn": [False], "both": [True, False]}[args.ends]
    methods = tuple(args.methods)
    rows = []
    for case in cases(args.datasets, args.limit, args.structures):
        for name in case.masks:
            for k in args.k:
                for e, (variant, overrides) in itertools.product(ends, variants):
                    row = run_structure(engine, case, name, k, e, replace(options, **overrides), methods)
                    row["variant"] = variant
                    rows.append(row)
                    print(f"{variant} {case.dataset} {case.patient} {name} k={k} ends={e}: "
                          + ", ".join(f"{m} {row[m]['dice']:.3f}" for m in methods), flush=True)
    print(table(rows, methods))
    if "network" in methods:
        print("\nNext correction: Dice of the proposed slice per rule (lower = finds the worst slice)\n")
        print(next_rule_summary(rows))
    if args.json:
        args.json.write_text(json.dumps({"options": vars(args) | {"json": str(args.json)}, "rows": rows},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
