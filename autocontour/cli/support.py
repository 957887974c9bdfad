"""`autocontour support build` and `support list`: a clinic's support sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontour.cli.parsing import add_command, command_group, pacs_password


def add_support_commands(commands: argparse._SubParsersAction) -> None:
    support = command_group(commands, "support", "build and list support sets")
    build = add_command(support, "build", cmd_support_build,
                        help="build a support set from contoured CTs (NIfTI or DICOM + RTSTRUCT)")
    build.add_argument("name", help="support-set name (also the structure it segments, unless --structure)")
    build.add_argument("--case", nargs=2, metavar=("CT", "MASK"), type=Path, action="append", default=[],
                       help="a CT (.nii.gz, or a DICOM series folder or zip) and its mask: a NIfTI mask or label map "
                            "on the same grid, or an RTSTRUCT .dcm (with --roi); repeat for more cases")
    build.add_argument("--roi", action="append", default=[],
                       help="RTSTRUCT ROI name, matched case-insensitively; repeat for a clinic's synonyms "
                            "(the first that a case has is used)")
    build.add_argument("--pacs-url", default=None, help="DICOMweb root: take the case from a study in the PACS")
    build.add_argument("--study", action="append", default=[],
                       help="Study Instance UID in --pacs-url (its CT series and RTSTRUCT); repeatable")
    build.add_argument("--username", default=None, help="PACS user")
    build.add_argument("--password", default=None, help="PACS password (default: $AUTOCONTOUR_PACS_PASSWORD)")
    build.add_argument("--from-result", type=Path, default=None,
                       help="an `autocontour segment` output folder whose draft was reviewed and corrected")
    build.add_argument("--mask", type=Path, default=None,
                       help="with --from-result: the corrected mask (NIfTI) or a corrected RTSTRUCT (with --roi)")
    build.add_argument("--ct", type=Path, default=None,
                       help="with --from-result: the CT it segmented (default: the result's review/ct.nii.gz); "
                            "checked against the result's fingerprint")
    build.add_argument("--structure", default=None, help="structure it segments (default: NAME)")
    build.add_argument("--display-name", default=None, help="name shown in previews, RTSTRUCT and DICOM-SEG")
    build.add_argument("--colour", default=None, metavar="R,G,B", help="display colour, 0-255 each")
    build.add_argument("--interpreted-type", default=None,
                       help="DICOM RT ROI Interpreted Type: ORGAN (default), CTV, GTV, PTV, AVOIDANCE, ...")
    build.add_argument("--tg263", default=None, help="AAPM TG-263 standard name, e.g. Kidney_L")
    build.add_argument("--laterality", default=None, choices=["left", "right", "midline", "bilateral"],
                       help="default: left/right for names ending _left/_right, else midline")
    build.add_argument("--components", type=int, default=None, help="connected pieces to keep (default 1)")
    build.add_argument("--tolerance-mm", type=float, default=None, help="surface-Dice tolerance (default 2)")
    build.add_argument("--no-atlas", action="store_true",
                       help="keep no small copy of each case (about 0.5 MB each): no registration prior for new scans")
    build.add_argument("--symmetric", action="store_true",
                       help="allow left-right mirrored copies to fill a short set (never for left/right structures)")
    how = build.add_mutually_exclusive_group()
    how.add_argument("--label", type=int, default=None, help="label value, when MASK is a label map")
    how.add_argument("--recipe", default=None,
                     help="recipe JSON file, or the name of a shipped recipe (support_sets/recipes/NAME.json)")
    build.add_argument("--label-names", type=Path, default=None,
                       help="JSON {value: name} for recipes (default: labels.json beside the mask)")
    build.add_argument("--size", type=int, default=64, help="slices in the set (default 64)")
    build.add_argument("--negative-fraction", type=float, default=0.125,
                       help="share of empty slices from just beyond the structure's ends (default 0.125)")
    build.add_argument("--description", default="", help="free text stored in the manifest")
    build.add_argument("--source", default="", help="where the cases come from and their licence")
    build.add_argument("--out", type=Path, required=True, help="output folder of the support set")
    listing = add_command(support, "list", cmd_support_list, help="list the support sets that segment would use")
    listing.add_argument("--support-dir", type=Path, action="append", default=[])
    listing.add_argument("--no-shipped-support", action="store_true")


def _definition_from_args(args: argparse.Namespace, structure: str, base=None):
    """The structure definition the user declared: flags over the base (a result's, a built-in, or a plain organ)."""
    from pydantic import ValidationError

    from autocontour.catalogue import default_definition
    from autocontour.errors import OptionError

    colour = None
    if args.colour:
        try:
            colour = tuple(int(v) for v in args.colour.split(","))
        except ValueError as exc:
            raise OptionError(f"--colour takes R,G,B integers, got {args.colour!r}") from exc
    fields = {"display_name": args.display_name, "colour": colour, "interpreted_type": args.interpreted_type,
              "tg263_name": args.tg263, "laterality": args.laterality, "max_components": args.components,
              "nsd_tolerance_mm": args.tolerance_mm}
    try:
        if base is not None:
            return base.model_validate(base.model_dump() | {k: v for k, v in fields.items() if v is not None})
        return default_definition(structure, **fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise OptionError(f"invalid structure definition: {'.'.join(str(p) for p in first['loc'])}: "
                          f"{first['msg']}") from exc


def cmd_support_build(args: argparse.Namespace) -> int:
    """Pick informative slices of one structure from contoured CTs, spread over its axial extent, and save them as
    a hash-addressed support set with a manifest (declaring the structure) and preview.png. Cases come from files
    (--case), a PACS (--pacs-url/--study) or a reviewed, corrected result (--from-result/--mask)."""
    import tempfile

    from autocontour.catalogue import parse_structures
    from autocontour.config import Settings
    from autocontour.errors import OptionError
    from autocontour.support.build import build_support_set, result_case
    from autocontour.support.recipes import Recipe

    structure = parse_structures(args.structure or args.name)[0]
    recipe = None
    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            path = Settings().shipped_support_dir / "recipes" / f"{args.recipe}.json"
        recipe = Recipe.from_file(path)
    if bool(args.study) != bool(args.pacs_url):
        raise OptionError("--pacs-url and --study go together")
    if bool(args.from_result) != bool(args.mask):
        raise OptionError("--from-result and --mask go together")
    cases = [tuple(c) for c in args.case]
    base = None
    with tempfile.TemporaryDirectory(prefix="autocontour-build-") as tmp:
        if args.pacs_url:
            from autocontour.dicom import pacs

            client = pacs.connect(args.pacs_url, args.username, pacs_password(args))
            cases += [pacs.fetch_contoured_case(client, study, Path(tmp) / f"study{i}")
                      for i, study in enumerate(args.study)]
        if args.from_result:
            ct, base = result_case(args.from_result, structure, args.ct)
            cases.append((ct, args.mask))
        if not cases:
            raise OptionError("give at least one --case CT MASK, --pacs-url URL --study UID, or --from-result DIR "
                              "--mask MASK")
        support = build_support_set(
            args.name, structure, cases, args.out, size=args.size, label=args.label,
            recipe=recipe, label_names=args.label_names, negative_fraction=args.negative_fraction,
            symmetric=args.symmetric, description=args.description, source=args.source, atlas=not args.no_atlas,
            definition=_definition_from_args(args, structure, base), rois=args.roi or None)
    print(f"support set {support.id}: {len(support)} slices of {structure} from {len(cases)} case(s) -> {args.out}")
    for warning in support.manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_support_list(args: argparse.Namespace) -> int:
    from autocontour.config import Settings
    from autocontour.support.store import discover

    settings = Settings()
    found = discover(settings.support_folders(args.support_dir, False if args.no_shipped_support else None))
    for structure, support in found.items():
        print(f"{structure:<16} {support.id}  {len(support):>3} slices  {len(support.manifest.source_cases)} case(s)  "
              f"{support.path}")
    return 0
