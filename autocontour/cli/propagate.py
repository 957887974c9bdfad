"""`autocontour propagate`: one structure from the few slices a planner drew on this patient's own CT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontour.cli.parsing import add_command


def add_propagate_command(commands: argparse._SubParsersAction) -> None:
    cmd = add_command(commands, "propagate", cmd_propagate,
                      help="propagate a structure from a few drawn slices to the rest of the CT")
    cmd.add_argument("ct", type=Path, help="CT volume in Hounsfield units (.nii or .nii.gz), or a DICOM CT series "
                                           "(a folder or a .zip)")
    cmd.add_argument("--structure", required=True, metavar="NAME",
                     help="the structure's name (lowercase letters, digits and _); it need not have a support set")
    cmd.add_argument("--drawn", type=Path, required=True, metavar="MASK",
                     help="NIfTI mask on the CT's grid (same size, spacing, origin, direction) holding the drawn "
                          "contours")
    cmd.add_argument("--slices", type=_slice_list, default=None, metavar="K,K,...",
                     help="the drawn slices, as indices along the CT file's third axis from 0 (NIfTI k; a DICOM "
                          "series: its slices in order of position); default: every slice where MASK holds any")
    cmd.add_argument("--ends", choices=["continue", "drawn"], default="continue",
                     help="continue (default): beyond the outermost drawn slices the structure goes on while it "
                          "shows; drawn: the outermost drawn slices are its ends")
    cmd.add_argument("--out", type=Path, required=True, help="output folder")
    cmd.add_argument("--weights", type=Path, default=None, help="checkpoint (.safetensors or .pt); default: shipped")
    cmd.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: auto (GPU if present)")
    cmd.add_argument("--precision", default=None, choices=["float32", "bfloat16", "float16"],
                     help="default: as segment (bfloat16 on GPU; on CPU bfloat16 only where it is native and "
                          "leaves the masks unchanged, else float32)")
    cmd.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _slice_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slice numbers, got {text!r}") from None


def cmd_propagate(args: argparse.Namespace) -> int:
    """Draw a structure on a few axial slices of a CT, and the network segments the other slices the way those
    drawn slices show (the drawn slices are the whole support set and come back exactly as drawn). Writes
    <structure>.nii.gz on the CT's grid and summary.json (each slice's provenance, where each end stopped and why,
    the slice to draw next). Results are drafts for clinical review."""
    from autocontour.catalogue import parse_structures
    from autocontour.config import Settings
    from autocontour.dicom.reading import read_input
    from autocontour.errors import InputImageError, UnknownStructureError
    from autocontour.pipeline import propagation

    names = parse_structures(args.structure)  # cheap checks before anything is read or loaded
    if len(names) != 1:
        raise UnknownStructureError(f"propagate draws one structure; got {len(names)}: {', '.join(names)}")
    for role, path in (("CT", args.ct), ("drawn mask", args.drawn)):
        if not path.exists():
            raise InputImageError(f"{role} not found: {path}")
    settings = Settings()
    ct, _ = read_input(args.ct, settings)
    mask = propagation.read_drawn_mask(args.drawn, ct, settings)
    case = propagation.DrawnCase.of(ct, mask, args.slices)  # every input checked before the model loads
    model = propagation.load_model(settings, args.weights, args.device, args.precision)
    outcome = propagation.propagate_structure(model.engine, case, names[0], args.ends == "drawn", model.describe())
    propagation.write_propagation(args.out, outcome)
    if not args.quiet:
        report(outcome.summary, args.out)
    return 0


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
        print(f"  draw next: slice {nxt['input_slice']} (rule: {nxt['rule']}, the least decided propagated slice)")
    print(f"  total {summary['seconds']:.1f} s on {summary['model']['device']}", file=sys.stdout)
