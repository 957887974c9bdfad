"""`autocontour propagate`: one structure from the few slices a planner drew on this patient's own CT."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from autocontour.cli.parsing import add_command

if TYPE_CHECKING:
    from autocontour.config import Settings
    from autocontour.pipeline.propagation import DrawnCase


def add_propagate_command(commands: argparse._SubParsersAction) -> None:
    cmd = add_command(commands, "propagate", cmd_propagate,
                      help="propagate a structure from a few drawn slices to the rest of the CT")
    cmd.add_argument("ct", type=Path, help="CT volume in Hounsfield units (.nii or .nii.gz), or a DICOM CT series "
                                           "(a folder or a .zip)")
    cmd.add_argument("--structure", required=True, metavar="NAME",
                     help="the structure's name (lowercase letters, digits and _); it need not have a support set")
    add_drawing_arguments(cmd, "drawn")
    cmd.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(cmd)


def add_drawing_arguments(cmd: argparse.ArgumentParser, verb: str) -> None:
    """The flags that say what a clinician drew (`verb`: drawn or corrected), as propagate and refine share them."""
    cmd.add_argument("--drawn", type=Path, required=True, metavar="MASK",
                     help=f"NIfTI mask on the CT's grid (same size, spacing, origin, direction) holding the {verb} "
                          f"contours, or an RTSTRUCT file (with --roi) whose ROI is contoured on the {verb} slices")
    cmd.add_argument("--roi", default=None, metavar="ROI_NAME",
                     help=f"with an RTSTRUCT as --drawn: the ROI that holds the {verb} contours (case-insensitive)")
    erasing = "; a listed slice where MASK holds nothing erases the structure there" if verb == "corrected" else ""
    cmd.add_argument("--slices", type=slice_list, default=None, metavar="K,K,...",
                     help=f"the {verb} slices, as indices along the CT file's third axis from 0 (NIfTI k; a DICOM "
                          f"series: its slices in order of position){erasing}; default: every slice where MASK "
                          "holds any")
    ends = ("the outermost drawn slices are its ends" if verb == "drawn" else
            "a correction does not extend the structure past its present ends")
    cmd.add_argument("--ends", choices=["continue", "drawn"], default="continue",
                     help=f"continue (default): beyond the outermost {verb} slices the structure goes on while it "
                          f"shows; drawn: {ends}")


def add_model_arguments(cmd: argparse.ArgumentParser) -> None:
    """The network's flags, as segment has them."""
    cmd.add_argument("--weights", type=Path, default=None, help="checkpoint (.safetensors or .pt); default: shipped")
    cmd.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    cmd.add_argument("--precision", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: as segment (bfloat16 on GPU; on CPU bfloat16 only where it is native and "
                          "leaves the masks unchanged, else float32)")
    cmd.add_argument("--quiet", action="store_true", help="print nothing but errors")


def slice_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slice numbers, got {text!r}") from None


def cmd_propagate(args: argparse.Namespace) -> int:
    """Draw a structure on a few axial slices of a CT, and the network segments the other slices the way those
    drawn slices show (the drawn slices are the whole support set and come back exactly as drawn). Writes
    <structure>.nii.gz on the CT's grid and summary.json (each slice's provenance, where each end stopped and why,
    the slice to draw next). Results are drafts for clinical review."""
    from autocontour.config import Settings
    from autocontour.pipeline import propagation
    from autocontour.pipeline.editing import Edit, record

    settings = Settings()
    structure, case = read_case(settings, args.ct, args.structure, args.drawn, args.slices, args.roi)
    model = propagation.load_model(settings, args.weights, args.device, args.precision)
    start = time.perf_counter()
    outcome = propagation.propagate_structure(model.engine, case, structure, args.ends == "drawn", model.describe())
    propagation.write_propagation(args.out, outcome)
    record(args.out, Edit(structure, case, args.ends == "drawn"), outcome.result, None, start)
    if not args.quiet:
        report(outcome.summary, args.out)
    return 0


def read_case(settings: Settings, ct_path: Path, structure: str, drawn: Path, slices: list[int] | None,
              roi: str | None = None, erasing: bool = False) -> tuple[str, DrawnCase]:
    """The structure's name, the CT and the drawn mask, all checked before the model loads."""
    from autocontour.catalogue import parse_structures
    from autocontour.dicom.reading import read_input
    from autocontour.errors import InputImageError, UnknownStructureError
    from autocontour.pipeline import propagation

    names = parse_structures(structure)  # cheap checks before anything is read or loaded
    if len(names) != 1:
        raise UnknownStructureError(f"one structure at a time; got {len(names)}: {', '.join(names)}")
    for role, path in (("CT", ct_path), ("drawn mask", drawn)):
        if not path.exists():
            raise InputImageError(f"{role} not found: {path}")
    ct, _ = read_input(ct_path, settings)
    mask = propagation.read_drawn(drawn, ct, settings, roi)
    return names[0], propagation.DrawnCase.of(ct, mask, slices, erasing)


def report(summary: dict, out: Path) -> None:
    """The few lines a planner reads: draft, volume, what was drawn and propagated, the ends, what next."""
    print(f"DRAFT contour for clinical review, written to {out}")
    print(f"  {summary['structure']:<16} {summary['volume_ml']:>9.1f} mL  {len(summary['drawn_slices'])} slice(s) "
          f"drawn, {len(summary['propagated_slices'])} propagated (slice numbers: input file's third axis)")
    for end in summary["ends"]:
        print(f"  {end['side']} end: slice {end['input_slice']} ({end['reason']})")
    nxt = summary["next_slice"]
    if nxt is None:
        print("  nothing propagated: no slice to suggest")
    else:
        print(f"  draw next: slice {nxt['input_slice']} "
              f"(rule: {nxt['rule']}: the middle of the longest propagated run across the most change)")
    print(f"  total {summary['seconds']:.1f} s on {summary['model']['device']}", file=sys.stdout)
