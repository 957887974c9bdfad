"""`autocontour evaluate` and `crossval`: measuring masks and support sets."""

from __future__ import annotations

import argparse
from pathlib import Path

from autocontour.catalogue import DEFAULT_STRUCTURES
from autocontour.cli.parsing import add_command


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    evaluate = add_command(commands, "evaluate", cmd_evaluate, help="measure predicted masks against reference masks")
    evaluate.add_argument("--pred", type=Path, required=True, help="mask file, label map, or folder of <name>.nii.gz")
    evaluate.add_argument("--ref", type=Path, required=True, help="mask file, label map, or folder of <name>.nii.gz")
    evaluate.add_argument("--structures", default=None, help="comma-separated subset (default: all predicted)")
    evaluate.add_argument("--tolerance-mm", default=None, help="surface-Dice tolerances, e.g. 1,2,3,5 (default 1,2,3)")
    evaluate.add_argument("--structure-tolerance", action="append", default=[], metavar="NAME=MM[,MM]",
                          help="extra surface-Dice tolerances for one structure, e.g. ctvn=5; 'catalogue' adds "
                               "each catalogue structure's own (autocontour structures); repeatable")
    evaluate.add_argument("--ref-labels", type=Path, default=None,
                          help="JSON {value: name} for a reference label map (default: labels.json beside it)")
    evaluate.add_argument("--ct", type=Path, default=None, help="the CT, for comparison pictures (preview.png)")
    evaluate.add_argument("--out", type=Path, required=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Dice, Jaccard, precision, recall, RVD, volumes, HD, HD95, ASD and surface Dice (DeepMind definitions, true
    spacing). Pairs by structure name, or by label value for label maps; accepts the output folder of `autocontour
    segment`. Writes metrics.json, metrics.csv, metrics.md and plots/."""
    from autocontour.evaluation.evaluate import (
        evaluate_pairs,
        pair_inputs,
        parse_structure_tolerances,
        parse_tolerances,
        report_tolerances,
        write_report,
    )

    tolerances = parse_tolerances(args.tolerance_mm)
    by_structure = parse_structure_tolerances(args.structure_tolerance)
    structures = [s.strip() for s in args.structures.split(",")] if args.structures else None
    pairs = pair_inputs(args.pred, args.ref, structures, args.ref_labels)
    records = evaluate_pairs(pairs, tolerances, by_structure)
    written = write_report(records, args.out, report_tolerances(tolerances, by_structure))
    if args.ct:
        from autocontour.evaluation.evaluate import comparison_preview

        comparison_preview(args.ct, pairs, args.out / "preview.png")
    print(written["markdown"].read_text())
    print(f"written to {args.out}")
    return 0


def add_crossval_command(commands: argparse._SubParsersAction) -> None:
    crossval = add_command(commands, "crossval", cmd_crossval,
                           help="leave-one-case-out cross-validation of support sets")
    crossval.add_argument("--case", nargs=2, metavar=("CT", "LABELS"), type=Path, action="append", default=[])
    crossval.add_argument("--phantoms", type=int, default=0)
    crossval.add_argument("--structures", default=",".join(DEFAULT_STRUCTURES))
    crossval.add_argument("--support-set-size", type=int, default=32)
    crossval.add_argument("--support-size", type=int, default=None)
    crossval.add_argument("--weights", type=Path, default=None)
    crossval.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    crossval.add_argument("--tolerance-mm", default=None)
    crossval.add_argument("--out", type=Path, required=True)


def cmd_crossval(args: argparse.Namespace) -> int:
    """For each labelled case, build support sets from the others with the shipped recipes, segment it, and
    measure. --phantoms adds synthetic cases (useful with a single real case)."""
    from autocontour.catalogue import parse_structures
    from autocontour.evaluation.crossval import cross_validate
    from autocontour.evaluation.evaluate import parse_tolerances

    records = cross_validate([tuple(c) for c in args.case], parse_structures(args.structures), args.out,
                             weights=args.weights, phantoms=args.phantoms, support_set_size=args.support_set_size,
                             support_size=args.support_size, tolerances_mm=parse_tolerances(args.tolerance_mm),
                             device=args.device)
    print((args.out / "metrics.md").read_text())
    print(f"{len(records)} records written to {args.out}")
    return 0
