"""`autocontour refine`: corrections on a result; the corrected slices are truth, the slices they affect follow."""

from __future__ import annotations

import argparse
from pathlib import Path

from autocontour.cli.parsing import add_command
from autocontour.cli.propagate import add_drawing_arguments, add_model_arguments


def add_refine_command(commands: argparse._SubParsersAction) -> None:
    cmd = add_command(commands, "refine", cmd_refine,
                      help="correct slices of a result and re-propagate the slices they affect")
    cmd.add_argument("result", type=Path, metavar="RESULT_DIR", help="a folder written by segment, propagate or "
                                                                     "refine")
    cmd.add_argument("--ct", type=Path, default=None,
                     help="the CT the result was made from (default: RESULT_DIR/review/ct.nii.gz where present)")
    cmd.add_argument("--structure", required=True, metavar="NAME", help="the structure corrected; one the result "
                                                                        "does not hold starts from the drawn slices")
    add_drawing_arguments(cmd, "corrected")
    add_model_arguments(cmd)


def cmd_refine(args: argparse.Namespace) -> int:
    """Correct some slices of a structure in a result folder. The corrected slices are truth and come back exactly;
    the slices between them and the neighbouring drawn slices (of a draft, within 20 mm) are re-propagated; all
    others keep their contour. Every edit is a new version under RESULT_DIR/versions/STRUCTURE/ (nothing is
    overwritten); RESULT_DIR/STRUCTURE.nii.gz becomes the newest and summary.json names it."""
    from autocontour.cli.propagate import read_case
    from autocontour.config import Settings
    from autocontour.errors import InputImageError
    from autocontour.pipeline import propagation
    from autocontour.pipeline.editing import Edit, apply_edit
    from autocontour.pipeline.outputs import REVIEW_CT
    from autocontour.pipeline.versions import note_in_summary

    if not args.result.is_dir():
        raise InputImageError(f"result folder not found: {args.result}")
    ct_path = args.ct or args.result / REVIEW_CT
    if args.ct is None and not ct_path.is_file():
        raise InputImageError(f"{args.result} holds no copy of the CT: give it with --ct")
    settings = Settings()
    structure, case = read_case(settings, ct_path, args.structure, args.drawn, args.slices, args.roi,
                                erasing=True)
    model = propagation.load_model(settings, args.weights, args.device, args.precision)
    version = apply_edit(model.engine, args.result, Edit(structure, case, args.ends == "drawn"))
    note_in_summary(args.result, structure, version)
    if not args.quiet:
        print(f"DRAFT contour for clinical review: {structure} version {version.version} ({version.kind}) in "
              f"{args.result}")
        print(f"  {version.volume_ml:.1f} mL; corrected slices {version.corrected_slices}; "
              f"{len(version.changed_slices)} slice(s) changed; {version.seconds:.1f} s")
        if version.next_slice is not None:
            print(f"  correct next: slice {version.next_slice}")
    return 0
