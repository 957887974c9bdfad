"""`autocontour support build`, `support add` and `support list`: a clinic's support sets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontour.cli.parsing import add_command, command_group, pacs_password


def add_support_commands(commands: argparse._SubParsersAction) -> None:
    support = command_group(commands, "support", "build, grow and list support sets")
    build = add_command(support, "build", cmd_support_build,
                        help="build a support set from contoured CTs (NIfTI or DICOM + RTSTRUCT)")
    build.add_argument("name", help="support-set name (also the structure it segments, unless --structure)")
    _case_arguments(build)
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
    build.add_argument("--symmetric", action="store_true",
                       help="allow left-right mirrored copies to fill a short set (never for left/right structures)")
    build.add_argument("--size", type=int, default=64, help="slices in the set (default 64)")
    build.add_argument("--negative-fraction", type=float, default=0.125,
                       help="share of empty slices from just beyond the structure's ends (default 0.125)")
    build.add_argument("--description", default="", help="free text stored in the manifest")
    build.add_argument("--source", default="", help="where the cases come from and their licence")
    build.add_argument("--out", type=Path, required=True, help="output folder of the support set")
    add = add_command(support, "add", cmd_support_add,
                      help="add contoured cases to an existing support set, keeping the cases it has")
    add.add_argument("set_dir", type=Path, metavar="SET_DIR", help="the support set's folder")
    _case_arguments(add)
    add.add_argument("--slices-per-case", type=int, default=None,
                     help="slices each new case adds (default: the set's slices per case so far)")
    add.add_argument("--out", type=Path, default=None,
                     help="write the grown set to this new folder (default: grow SET_DIR in place)")
    listing = add_command(support, "list", cmd_support_list, help="list the support sets that segment would use")
    listing.add_argument("--support-dir", type=Path, action="append", default=[])
    listing.add_argument("--no-shipped-support", action="store_true")


def _case_arguments(parser: argparse.ArgumentParser) -> None:
    """Where cases come from and how their masks are read: the same for `support build` and `support add`."""
    parser.add_argument("--case", nargs=2, metavar=("CT", "MASK"), type=Path, action="append", default=[],
                        help="a CT (.nii.gz, or a DICOM series folder or zip) and its mask: a NIfTI mask or label map "
                             "on the same grid, or an RTSTRUCT .dcm (with --roi); repeat for more cases")
    parser.add_argument("--roi", action="append", default=[],
                        help="RTSTRUCT ROI name, matched case-insensitively; repeat for a clinic's synonyms "
                             "(the first that a case has is used)")
    parser.add_argument("--allow-unapproved", action="store_true",
                        help="take RTSTRUCTs that no clinician approved (ApprovalStatus UNAPPROVED or REJECTED, or "
                             "an autocontour draft); refused by default, since a support case teaches the network")
    parser.add_argument("--pacs-url", default=None, help="DICOMweb root: take the case from a study in the PACS")
    parser.add_argument("--study", action="append", default=[],
                        help="Study Instance UID in --pacs-url (its CT series and newest approved RTSTRUCT); "
                             "repeatable")
    parser.add_argument("--username", default=None, help="PACS user")
    parser.add_argument("--password", default=None, help="PACS password (default: $AUTOCONTOUR_PACS_PASSWORD)")
    parser.add_argument("--from-result", type=Path, default=None,
                        help="an `autocontour segment` output folder whose draft was reviewed and corrected")
    parser.add_argument("--mask", type=Path, default=None,
                        help="with --from-result: the corrected mask (NIfTI) or a corrected RTSTRUCT (with --roi)")
    parser.add_argument("--ct", type=Path, default=None,
                        help="with --from-result: the CT it segmented (default: the result's review/ct.nii.gz); "
                             "checked against the result's fingerprint")
    parser.add_argument("--no-atlas", action="store_true",
                        help="keep no small copy of each case (about 0.5 MB each): no registration prior for new scans")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--label", type=int, default=None, help="label value, when MASK is a label map")
    how.add_argument("--recipe", default=None,
                     help="recipe JSON file, or the name of a shipped recipe (support_sets/recipes/NAME.json)")
    parser.add_argument("--label-names", type=Path, default=None,
                        help="JSON {value: name} for recipes (default: labels.json beside the mask)")


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


def _case_rules(args: argparse.Namespace):
    """How the command's cases are read: --label or --recipe, --roi, --no-atlas, --allow-unapproved."""
    from autocontour.config import Settings
    from autocontour.support.build import CaseRules
    from autocontour.support.recipes import Recipe

    recipe = None
    if args.recipe:
        path = Path(args.recipe)
        if not path.is_file():
            path = Settings().shipped_support_dir / "recipes" / f"{args.recipe}.json"
        recipe = Recipe.from_file(path)
    return CaseRules(label=args.label, recipe=recipe, label_names=args.label_names, rois=args.roi or None,
                     atlas=not args.no_atlas, allow_unapproved=args.allow_unapproved)


def _gather_cases(args: argparse.Namespace, structure: str, scratch: Path) -> tuple[list, object]:
    """The command's cases (files, PACS studies fetched into `scratch`, a corrected result), and the result's
    definition of the structure when a result is one of them."""
    from autocontour.errors import OptionError
    from autocontour.support.build import result_case
    from autocontour.support.provenance import CaseFiles

    if bool(args.study) != bool(args.pacs_url):
        raise OptionError("--pacs-url and --study go together")
    if bool(args.from_result) != bool(args.mask):
        raise OptionError("--from-result and --mask go together")
    cases = [CaseFiles(ct, mask) for ct, mask in args.case]
    base = None
    if args.pacs_url:
        from autocontour.dicom import pacs

        client = pacs.connect(args.pacs_url, args.username, pacs_password(args))
        for i, study in enumerate(args.study):
            ct, mask = pacs.fetch_contoured_case(client, study, scratch / f"study{i}", args.allow_unapproved)
            cases.append(CaseFiles(ct, mask, "pacs", study))
    if args.from_result:
        ct, base = result_case(args.from_result, structure, args.ct)
        cases.append(CaseFiles(ct, args.mask, "result"))
    if not cases:
        raise OptionError("give at least one --case CT MASK, --pacs-url URL --study UID, or --from-result DIR "
                          "--mask MASK")
    return cases, base


def cmd_support_build(args: argparse.Namespace) -> int:
    """Pick informative slices of one structure from contoured CTs, spread over its axial extent, and save them as
    a hash-addressed support set with a manifest (declaring the structure and each case's provenance) and
    preview.png. Cases come from files (--case), a PACS (--pacs-url/--study) or a reviewed, corrected result
    (--from-result/--mask). An RTSTRUCT that no clinician approved is refused unless --allow-unapproved."""
    import tempfile

    from autocontour.catalogue import parse_structures
    from autocontour.support.build import build_support_set

    structure = parse_structures(args.structure or args.name)[0]
    rules = _case_rules(args)
    with tempfile.TemporaryDirectory(prefix="autocontour-build-") as tmp:
        cases, base = _gather_cases(args, structure, Path(tmp))
        support = build_support_set(
            args.name, structure, cases, args.out, size=args.size, label=rules.label, recipe=rules.recipe,
            label_names=rules.label_names, negative_fraction=args.negative_fraction, symmetric=args.symmetric,
            description=args.description, source=args.source, atlas=rules.atlas,
            definition=_definition_from_args(args, structure, base), rois=rules.rois,
            allow_unapproved=rules.allow_unapproved)
    print(f"support set {support.id}: {len(support)} slices of {structure} from {len(cases)} case(s) -> {args.out}")
    for warning in support.manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_support_add(args: argparse.Namespace) -> int:
    """Add contoured cases to an existing support set without restating the ones it has: the set keeps its
    slices, structure definition, preprocessing and crop, and each new case adds slices picked as `support build`
    picks them. A scan the set already has (same fingerprint, however stored) and an RTSTRUCT that no clinician
    approved are refused. The grown set has a new id; each case's provenance is recorded in its manifest."""
    import tempfile

    from autocontour.support.grow import add_cases
    from autocontour.support.store import load_support_set

    before = load_support_set(args.set_dir)
    with tempfile.TemporaryDirectory(prefix="autocontour-build-") as tmp:
        cases, _ = _gather_cases(args, before.structure, Path(tmp))
        support = add_cases(args.set_dir, cases, _case_rules(args), args.slices_per_case, args.out)
    print(f"support set {support.id}: {len(support)} slices of {support.structure} from "
          f"{len(support.manifest.source_cases)} case(s), {len(cases)} added (was {before.id}) -> {support.path}")
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
