"""`autocontour segment` and `autocontour structures`: draft contours for one CT, and what can be drawn."""

from __future__ import annotations

import argparse
from pathlib import Path

from autocontour.cli import parsing


def add_segment_command(commands: argparse._SubParsersAction) -> None:
    seg = parsing.add_command(commands, "segment", cmd_segment, help="segment a CT volume into draft masks")
    seg.add_argument("ct", type=Path, help="CT volume in Hounsfield units (.nii or .nii.gz), or a DICOM CT series "
                                           "(a folder or a .zip); DICOM input also gives rtstruct.dcm and seg.dcm")
    seg.add_argument("--out", type=Path, required=True, help="output folder")
    seg.add_argument("--structures", default=None, help=parsing.structures_help())
    parsing.inference_options(seg)
    seg.add_argument("--series", dest="series_uid", default=None, metavar="UID",
                     help=parsing.described("series_uid"))
    parsing.roi_names_option(seg)
    seg.add_argument("--probabilities", action="store_true", help=parsing.described("probabilities"))
    seg.add_argument("--no-preview", action="store_true", help="skip preview.png")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment a CT (NIfTI, or a DICOM series as a folder or zip) and write one NIfTI mask per structure on the
    CT's grid, summary.json (confidence, flagged slices, volumes, provenance) and preview.png (DICOM input: also
    rtstruct.dcm and seg.dcm). Results are drafts for clinical review."""
    from autocontour.catalogue import parse_structures
    from autocontour.errors import InputImageError

    if args.structures is not None:  # cheap checks before the model loads (the loaded sets decide the rest)
        parse_structures(args.structures)
    options = parsing.segment_options(args)
    if not args.ct.exists():
        raise InputImageError(f"file not found: {args.ct}")
    segmenter = parsing.segmenter_from(args)
    update, close = parsing.progress_bar(args.quiet)
    try:
        result = segmenter.segment(args.ct, args.out, options, progress=update)
    finally:
        close()
    parsing.print_report(result.summary, args.out)
    return 0


def add_structures_command(commands: argparse._SubParsersAction) -> None:
    structures = parsing.add_command(commands, "structures", cmd_structures,
                                     help="list the structures the support sets provide, and the overlap rules")
    structures.add_argument("--support-dir", type=Path, action="append", default=[])
    structures.add_argument("--no-shipped-support", action="store_true")
    structures.add_argument("--rules", type=Path, default=None, help="overlap-rules JSON (default: shipped)")


def cmd_structures(args: argparse.Namespace) -> int:
    """The structures the loaded support sets declare (and the built-in cervix ones without a set), with how to
    add one."""
    from autocontour.catalogue import Catalogue
    from autocontour.config import Settings
    from autocontour.rules import load_rules
    from autocontour.support.store import discover

    settings = Settings()
    supports = discover(settings.support_folders(args.support_dir, False if args.no_shipped_support else None))
    catalogue = Catalogue.from_definitions({n: s.definition for n, s in supports.items()})
    for s in catalogue:
        support = supports.get(s.name)
        where = support.id if support else f"no set: autocontour support build {s.name} --case CT MASK --out DIR"
        print(f"{s.name:<16} {s.display_name:<16} {s.interpreted_type:<6} {s.laterality:<9} "
              f"TG-263 {s.tg263_name or '-':<10} tolerance {s.nsd_tolerance_mm:g} mm  {where}")
    rules = load_rules(args.rules or settings.rules)
    print(f"overlap rules {rules.name!r}: " + "; ".join(
        "exclusive: " + ", ".join(g) for g in rules.exclusive_groups) + "; allowed: " + ", ".join(
        " & ".join(p) for p in rules.allowed_pairs))
    return 0
