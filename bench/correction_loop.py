"""The correction loop with a simulated clinician: how many corrected slices until a structure is done.

A clinician starts a structure either from nothing (three drawn slices, both ends included: `propagate`)
or from the cross-patient draft `autocontour segment` drew for it, then corrects one slice at a time; each
correction replaces that slice with the reference slice and re-propagates the slices it affects (`refine`,
with the options `autocontour/pipeline/editing.py` gives it). The loop stops when surface Dice at the
structure's catalogue tolerance reaches --target on the whole structure, or after --cap corrections.

Three clinicians, in one process on the same engine:
- suggestion: corrects the slice the product suggests (`Propagation.next_slice`: `suggest_next` after a
  refine, the "uncertainty" rule after a propagate);
- before: the rule `suggest_next` had before this benchmark (the least decided propagated slice), kept here
  to measure the change against;
- even: corrects evenly spread slices, one at a time: the middle of the widest gap between the slices drawn
  or corrected so far (from the draft: and the reference structure's ends), i.e. the slices a planner who
  bisects would draw. From nothing, the k-even-slices propagation at the suggestion's final k is also run.

Seconds of every propagate and refine are printed (2 shared CPU cores; other processes run beside it).

The draft needs a shipped support set for the structure (support_sets/: bladder, anorectum, ctvn); all
three were built from the pelvic example CT itself, so the pelvic bladder's "draft" is a self-support
draft, not a cross-patient one: reported, but as an upper bound. Other structures have no draft row.

Run (small first):
    PYTHONPATH=. nice -n 5 python bench/correction_loop.py --datasets pelvis --structures urinary_bladder --cap 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from propagation import STRUCTURES, Case, cases, drawn_slices  # noqa: E402

from autocontour.catalogue import default_definition  # noqa: E402
from autocontour.config import Settings  # noqa: E402
from autocontour.engine import refinement  # noqa: E402
from autocontour.engine.propagation import (  # noqa: E402
    DRAWN,
    PROPAGATED,
    EndStop,
    Propagation,
    PropagationOptions,
    next_slice,
    propagate,
    runs,
)  # noqa: E402
from autocontour.engine.refinement import DRAFT, Correction, refine, suggest_next  # noqa: E402
from autocontour.engine.runner import Engine  # noqa: E402
from autocontour.evaluation.metrics import compute_metrics, nsd_key  # noqa: E402
from autocontour.pipeline import propagation as pipeline_propagation  # noqa: E402
from autocontour.pipeline.propagation import NEXT_RULE  # noqa: E402

DRAFT_SETS = {"urinary_bladder": "bladder"}  # reference label -> shipped support set drawing it
SELF_SUPPORT = {"pelvis"}  # datasets whose CT the shipped sets were built from


@dataclass
class Step:
    corrections: int
    corrected_slice: int | None
    dice: float
    nsd: float
    seconds: float  # of the propagate or refine that made this version (0 for segment's draft)
    changed: int  # slices whose contour changed (at step 0: slices holding the structure)


@dataclass
class Loop:
    start: str  # "nothing" (3 drawn slices) or "draft"
    clinician: str  # "suggestion" or "even"
    steps: list[Step] = field(default_factory=list)

    def needed(self, target: float) -> int | None:
        """Corrections until the target was reached (None: not within the cap)."""
        return next((s.corrections for s in self.steps if s.nsd >= target), None)

    def drops(self) -> int:
        """Corrections after which surface Dice went down."""
        return sum(b.nsd < a.nsd - 1e-6 for a, b in zip(self.steps, self.steps[1:], strict=False))


def score(mask: np.ndarray, ref: np.ndarray, spacing: tuple, tolerance: float) -> tuple[float, float]:
    """(Dice, surface Dice at the tolerance) of the whole structure, on the two masks' common box."""
    both = mask | ref
    if not both.any():
        return 1.0, 1.0
    box = tuple(slice(max(0, int(a.min()) - 2), int(a.max()) + 3) for a in np.nonzero(both))
    m, _ = compute_metrics(mask[box], ref[box], spacing, (tolerance,))
    return float(m["dice"]), float(m[nsd_key(tolerance)] or 0.0)


def even_pick(result: Propagation, ref: np.ndarray, with_ends: bool) -> int | None:
    """The middle of the widest gap between drawn slices (and, `with_ends`, the reference's ends)."""
    anchors = {int(z) for z in np.nonzero(result.provenance == DRAWN)[0]}
    if with_ends:
        filled = np.nonzero(ref.any(axis=(1, 2)))[0]
        anchors |= {int(filled[0]) - 1, int(filled[-1]) + 1}
    order = sorted(anchors)
    gaps = [(b - a, (a + b) // 2) for a, b in zip(order, order[1:], strict=False) if b - a > 1]
    return max(gaps)[1] if gaps else None


def rule_before(start: Propagation, dz_mm: float) -> Callable[[Propagation], int | None]:
    """The rule suggest_next had before this benchmark, to measure against: the longest unreached draft run
    as now, else the propagated slice whose fused probability is least decided ("uncertainty")."""

    def pick(result: Propagation) -> int | None:
        if result is start:
            return result.next_slice
        flags = result.provenance == DRAFT
        longest = max(((b - a + 1, (a + b) // 2) for a, b in runs(flags)), default=None)
        propagated = np.nonzero(result.provenance == PROPAGATED)[0]
        drawn = np.nonzero(result.provenance == DRAWN)[0]
        if longest is not None and (longest[0] * dz_mm > 2 * refinement.DRAFT_WINDOW_MM or not len(propagated)):
            return longest[1]
        fused, network = result.probability, result.network
        return next_slice("uncertainty", propagated, list(drawn), network, fused, fused > 0.5)

    return pick


def clinicians(start: Propagation, ref: np.ndarray, dz_mm: float, with_ends: bool
               ) -> dict[str, Callable[[Propagation], int | None]]:
    return {"suggestion": lambda r: r.next_slice, "before": rule_before(start, dz_mm),
            "even": lambda r: even_pick(r, ref, with_ends)}


def run_loop(engine: Engine, case: Case, name: str, loop: Loop, start: Propagation,
             pick: Callable[[Propagation], int | None], options: PropagationOptions, cap: int, target: float,
             start_seconds: float) -> Loop:
    """Correct the picked slice with the reference slice and refine, until the target or the cap."""
    ref, spacing = case.masks[name], case.ct.spacing_zyx
    tolerance = default_definition(name).nsd_tolerance_mm
    result = start
    loop.steps.append(Step(0, None, *score(result.mask, ref, spacing, tolerance), start_seconds,
                           int(result.mask.any(axis=(1, 2)).sum())))
    while loop.steps[-1].nsd < target and len(loop.steps) <= cap:
        z = pick(result)
        if z is None:
            break
        before = result.mask
        result = refine(engine, case.ct, Correction(result.mask, result.provenance, ref, (z,)), options)
        changed = int((before != result.mask).any(axis=(1, 2)).sum())
        loop.steps.append(Step(len(loop.steps), z, *score(result.mask, ref, spacing, tolerance), result.seconds,
                               changed))
        print(f"    {loop.start}/{loop.clinician} #{len(loop.steps) - 1} slice {z}: NSD {loop.steps[-1].nsd:.3f} "
              f"({result.seconds:.1f} s, {changed} slices changed)", flush=True)
    return loop


def from_nothing(engine: Engine, case: Case, name: str, options: PropagationOptions, cap: int,
                 target: float) -> tuple[list[Loop], dict]:
    """Three drawn slices, ends included, then each clinician's corrections; and the k-even propagation at
    the suggestion's final k."""
    ref = case.masks[name]
    options = replace(options, ends_drawn=True)
    drawn = drawn_slices(ref, 3, True)
    only = np.zeros_like(ref)
    only[drawn] = ref[drawn]
    start = propagate(engine, case.ct, only, drawn, options)
    print(f"  propagate from {drawn}: {start.seconds:.1f} s", flush=True)
    picks = clinicians(start, ref, case.ct.spacing_zyx[0], False)
    loops = [run_loop(engine, case, name, Loop("nothing", clinician), start, pick, options, cap, target,
                      start.seconds) for clinician, pick in picks.items()]
    k = 3 + len(loops[0].steps) - 1
    even = drawn_slices(ref, k, True)
    only = np.zeros_like(ref)
    only[even] = ref[even]
    again = propagate(engine, case.ct, only, even, options)
    tolerance = default_definition(name).nsd_tolerance_mm
    dice, nsd = score(again.mask, ref, case.ct.spacing_zyx, tolerance)
    return loops, {"k": len(even), "dice": dice, "nsd": nsd, "seconds": again.seconds}


def segment_draft(case: Case, structure: str) -> tuple[np.ndarray, float]:
    """What `autocontour segment` draws for the structure with the shipped weights and sets (canonical)."""
    from autocontour.pipeline.segmenter import segment

    start = time.perf_counter()
    source = case.ct.input
    result = segment(source, None, {"structures": [structure], "preview": False})
    return case.ct.to_canonical(result.masks[structure]) != 0, time.perf_counter() - start


def from_draft(engine: Engine, case: Case, name: str, options: PropagationOptions, cap: int,
               target: float) -> list[Loop]:
    """segment's draft, then each clinician's corrections (ends not drawn: the CLI's default)."""
    draft, seconds = segment_draft(case, DRAFT_SETS[name])
    print(f"  segment's draft: {seconds:.1f} s", flush=True)
    options = replace(options, ends_drawn=False)
    provenance = np.where(draft.any(axis=(1, 2)), DRAFT, 0).astype(np.uint8)
    first = suggest_next(provenance, draft, case.ct.spacing_zyx[0])
    filled = np.nonzero(provenance)[0]
    ends = (EndStop("inferior", int(filled[0]), "draft"), EndStop("superior", int(filled[-1]), "draft"))
    start = Propagation(draft.astype(np.float32), draft, provenance, ends, first)
    ref = case.masks[name]
    picks = clinicians(start, ref, case.ct.spacing_zyx[0], True)
    return [run_loop(engine, case, name, Loop("draft", clinician), start, pick, options, cap, target, 0.0)
            for clinician, pick in picks.items()]


def _curve(loop: Loop) -> str:
    return " ".join(f"{s.nsd:.2f}" for s in loop.steps)


def _needed(loop: Loop, target: float, cap: int) -> str:
    n = loop.needed(target)
    return f">{len(loop.steps) - 1}" if n is None else str(n)


CLINICIANS = ("suggestion", "before", "even")


def loop_table(rows: list[dict], target: float, cap: int) -> str:
    """Per structure and start: corrections to the target per clinician, the ratio even / suggestion,
    corrections that lowered surface Dice, and the surface-Dice curves (after 0, 1, 2, ... corrections)."""
    lines = ["| dataset | patient | structure | slices | start | " + " | ".join(CLINICIANS)
             + " | even / suggestion | drops | " + " | ".join(f"NSD curve, {c}" for c in CLINICIANS) + " |",
             "|" + " --- |" * (7 + 2 * len(CLINICIANS))]
    for row in rows:
        for start in ("nothing", "draft"):
            loops = {lp.clinician: lp for lp in row["loops"] if lp.start == start}
            if not loops:
                continue
            ns, ne = loops["suggestion"].needed(target), loops["even"].needed(target)
            ratio = f"{ne / ns:.2f}" if ns and ne else ""
            lines.append(f"| {row['dataset']} | {row['patient']} | {row['structure']} | {row['slices']} | {start} | "
                         + " | ".join(_needed(loops[c], target, cap) for c in CLINICIANS) + f" | {ratio} | "
                         + " / ".join(str(loops[c].drops()) for c in CLINICIANS) + " | "
                         + " | ".join(_curve(loops[c]) for c in CLINICIANS) + " |")
    return "\n".join(lines)


def timing_table(rows: list[dict]) -> str:
    """Seconds per propagate (from 3 slices) and per refine: the first correction, and every correction."""
    lines = ["| dataset | patient | structure | slices | propagate s | first refine s (from nothing / draft) | "
             "refine s mean / max | refines |", "|" + " --- |" * 8]
    for row in rows:
        refines = [st.seconds for lp in row["loops"] for st in lp.steps[1:]]
        first = {lp.start: lp.steps[1].seconds for lp in row["loops"]
                 if lp.clinician == "suggestion" and len(lp.steps) > 1}
        firsts = " / ".join(f"{first[k]:.1f}" if k in first else "-" for k in ("nothing", "draft"))
        spread = f"{np.mean(refines):.1f} / {np.max(refines):.1f}" if refines else "-"
        lines.append(f"| {row['dataset']} | {row['patient']} | {row['structure']} | {row['slices']} | "
                     f"{row['propagate_seconds']:.1f} | {firsts} | {spread} | {len(refines)} |")
    return "\n".join(lines)


def summary_lines(rows: list[dict], target: float, cap: int) -> list[str]:
    """Per start: on how many structures each clinician needed fewer corrections (not reaching the target
    counts as cap + 1), and the total corrections where both reached it."""
    out = []
    for start, against in itertools.product(("nothing", "draft"), ("before", "even")):
        pairs = []
        for row in rows:
            needed = {lp.clinician: lp.needed(target) for lp in row["loops"] if lp.start == start}
            if needed:
                pairs.append((needed["suggestion"], needed[against]))
        if not pairs:
            continue
        counted = [(cap + 1 if s is None else s, cap + 1 if e is None else e) for s, e in pairs]
        both = [(s, e) for s, e in pairs if s is not None and e is not None]
        out.append(f"from {start}, suggestion vs {against}: {len(pairs)} structures; fewer corrections with the "
                   f"suggestion on {sum(s < e for s, e in counted)}, with {against} on "
                   f"{sum(e < s for s, e in counted)}, "
                   f"tied on {sum(s == e for s, e in counted)}; both reached the target on {len(both)}: "
                   f"{sum(s for s, _ in both)} corrections (suggestion) vs {sum(e for _, e in both)} ({against})")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["pelvis", "chest", "openkbp"], choices=list(STRUCTURES))
    p.add_argument("--structures", nargs="+", help="only these structures (of the dataset's bench list)")
    p.add_argument("--limit", type=int, default=3, help="openkbp validation patients")
    p.add_argument("--patients", nargs="+", help="only these patients (e.g. pt_202)")
    p.add_argument("--cap", type=int, default=15, help="most corrections per loop")
    p.add_argument("--target", type=float, default=0.95, help="surface Dice at the structure's tolerance")
    p.add_argument("--starts", nargs="+", default=["nothing", "draft"], choices=["nothing", "draft"])
    p.add_argument("--draft-window-mm", type=float, default=refinement.DRAFT_WINDOW_MM)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def run_structure(engine: Engine, case: Case, name: str, args: argparse.Namespace) -> dict:
    options = PropagationOptions(next_rule=NEXT_RULE)
    row: dict = {"dataset": case.dataset, "patient": case.patient, "structure": name,
                 "slices": int(case.masks[name].any(axis=(1, 2)).sum()), "loops": [], "propagate_seconds": float("nan")}
    print(f"{case.dataset} {case.patient} {name} ({row['slices']} slices)", flush=True)
    if "nothing" in args.starts:
        loops, k_even = from_nothing(engine, case, name, options, args.cap, args.target)
        row["loops"] += loops
        row["propagate_seconds"], row["k_even"] = loops[0].steps[0].seconds, k_even
        print(f"  k-even propagation at k = {k_even['k']}: NSD {k_even['nsd']:.3f} ({k_even['seconds']:.1f} s)",
              flush=True)
    if "draft" in args.starts and name in DRAFT_SETS:
        row["loops"] += from_draft(engine, case, name, options, args.cap, args.target)
        row["self_support"] = case.dataset in SELF_SUPPORT
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    refinement.DRAFT_WINDOW_MM = args.draft_window_mm
    settings = Settings()
    model = pipeline_propagation.load_model(settings, None, None, None)
    print(f"engine: {model.describe()['precision']} ({model.precision_note}), threads {settings.threads}; "
          f"draft window {refinement.DRAFT_WINDOW_MM} mm; target NSD {args.target}, cap {args.cap}", flush=True)
    rows = [run_structure(model.engine, case, name, args)
            for case in cases(args.datasets, args.limit, args.structures)
            if not args.patients or case.patient in args.patients for name in case.masks]
    print("\n" + loop_table(rows, args.target, args.cap))
    print("\n" + "\n".join(summary_lines(rows, args.target, args.cap)))
    k_even = [r for r in rows if "k_even" in r]
    if k_even:
        print("\nk-even propagation at the suggestion's final k (from nothing): "
              + "; ".join(f"{r['patient']} {r['structure']} k={r['k_even']['k']} NSD {r['k_even']['nsd']:.3f}"
                          for r in k_even))
    print("\n" + timing_table(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps([r | {"loops": [asdict(lp) for lp in r["loops"]]} for r in rows],
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
