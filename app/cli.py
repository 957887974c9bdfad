"""The `autocontour` command line.

argparse, because hospital scripts need exact, stable behaviour: every
mistake in the input ends with exit code 2 and one line on stderr that names
it; a result always ends with exit code 0. Heavy imports (torch) happen inside
the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app import __version__
from app.errors import AutocontourError

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as a single line (and exit code 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_BAD_INPUT)


def _structures_help() -> str:
    from app.catalogue import DEFAULT_STRUCTURES

    return (f"comma-separated names of structures the loaded support sets provide (`autocontour structures`; "
            f"default: {','.join(DEFAULT_STRUCTURES)} where loaded, else every loaded set)")


def _inference_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that runs the network (segment, pacs pull): one set, so they cannot drift."""
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint (.safetensors or .pt); default: shipped")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="default: auto (GPU if present)")
    parser.add_argument("--precision", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on GPU; on CPU bfloat16 only where the CPU has native bf16 and a "
                             "start-up check finds the masks unchanged, else float32")
    parser.add_argument("--support-size", type=int, default=None,
                        help="support slices per ensemble member (default: 16 on CPU, 64 on GPU)")
    parser.add_argument("--ensemble", type=int, default=None,
                        help="support subsets averaged (default: 1 on CPU, 3 on GPU)")
    parser.add_argument("--threshold", type=float, default=None, help="probability threshold (default 0.5)")
    parser.add_argument("--support-dir", type=Path, action="append", default=[],
                        help="folder of support sets (a clinic's own); overrides shipped sets of the same structure; "
                             "repeatable")
    parser.add_argument("--no-shipped-support", action="store_true", help="use only the --support-dir sets")
    parser.add_argument("--rules", type=Path, default=None,
                        help="overlap-rules JSON (default: $AUTOCONTOUR_RULES, else the shipped cervix rules)")
    parser.add_argument("--axial-search", choices=["coarse", "all"], default="coarse",
                        help="coarse: find each structure's extent first (default); all: segment every body slice, "
                             "also of a scan too short to place (under 120 mm)")
    parser.add_argument("--support-selection", choices=["level", "spread"], default="level",
                        help="level: examples from the query's relative axial level (default); spread: whole extent")
    parser.add_argument("--no-registration", action="store_true",
                        help="do not register the support sets' source cases to the scan (no registration prior: "
                             "the bone profile and a coarse search find each structure)")
    parser.add_argument("--crops", action="store_true",
                        help="fine pass on the support sets' structure-centred crops (off by default: the shipped "
                             "checkpoint, trained on whole-body views, segments worse on them)")
    parser.add_argument("--planes", choices=["axial", "three"], default="axial",
                        help="axial: the fine pass on axial slices (default); three: also on coronal and sagittal "
                             "cuts, with examples cut from the support sets' source cases, averaged (about twice "
                             "the network's work; see bench/RESULTS.md)")
    parser.add_argument("--prior-weight", type=float, default=None,
                        help="weight of the registration prior fused with the network, 0-1 (default: follows the "
                             "registration's quality, and the prior alone where the network draws almost nothing, "
                             "as chosen on bench/cross_patient.py)")


def _roi_names_option(parser: argparse.ArgumentParser) -> None:
    from app.dicom import ROI_NAME_STYLES

    parser.add_argument("--roi-names", choices=ROI_NAME_STYLES, default="display",
                        help="ROI names in rtstruct.dcm: the catalogue's display names (default) or TG-263 names "
                             "(the display name where a structure has none)")


def _segmenter(args: argparse.Namespace):
    """The Segmenter the inference options ask for."""
    from app.pipeline import Segmenter

    return Segmenter(weights=args.weights, device=args.device, precision=args.precision,
                     support_dirs=args.support_dir, shipped_support=False if args.no_shipped_support else None,
                     rules=args.rules)


def _segment_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of Segmenter.segment that the inference options set."""
    return {"support_size": args.support_size, "ensemble": args.ensemble, "threshold": args.threshold,
            "axial_search": args.axial_search, "support_selection": args.support_selection,
            "registration": not args.no_registration, "prior_weight": args.prior_weight, "crops": args.crops,
            "planes": args.planes}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="autocontour",
        description="Few-shot, in-context draft contours for cervical-cancer radiotherapy planning CT. "
                    "Every output is a DRAFT for review by a qualified clinician.")
    parser.add_argument("--version", action="version", version=f"autocontour {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    # in the order `autocontour --help` lists them; each command's parser sits beside its handler
    for add in (add_segment_command, add_support_commands, add_weights_commands, add_evaluate_command,
                add_crossval_command, add_train_command, add_finetune_command, add_serve_command,
                add_worker_command, add_submit_command, add_pacs_commands, add_keys_commands,
                add_health_command, add_structures_command):
        add(commands)
    return parser


def _command_group(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A command with subcommands of its own (`autocontour NAME SUBCOMMAND`); one is required."""
    return commands.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True,
                                                               parser_class=OneLineParser)


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour evaluate`: its arguments, beside its handler."""
    evaluate = commands.add_parser("evaluate", help="measure predicted masks against reference masks",
                                   description="Dice, Jaccard, precision, recall, RVD, volumes, HD, HD95, ASD and "
                                               "surface Dice (DeepMind definitions, true spacing). Pairs by structure "
                                               "name, or by label value for label maps; accepts the output folder of "
                                               "`autocontour segment`. Writes metrics.json, metrics.csv, metrics.md "
                                               "and plots/.")
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
    evaluate.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from app.evaluation.evaluate import (
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
        from app.evaluation.evaluate import comparison_preview

        comparison_preview(args.ct, pairs, args.out / "preview.png")
    print(written["markdown"].read_text())
    print(f"written to {args.out}")
    return 0


def add_crossval_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour crossval`: its arguments, beside its handler."""
    crossval = commands.add_parser("crossval", help="leave-one-case-out cross-validation of support sets",
                                   description="For each labelled case, build support sets from the others with the "
                                               "shipped recipes, segment it, and measure. --phantoms adds synthetic "
                                               "cases (useful with a single real case).")
    crossval.add_argument("--case", nargs=2, metavar=("CT", "LABELS"), type=Path, action="append", default=[])
    crossval.add_argument("--phantoms", type=int, default=0)
    crossval.add_argument("--structures", default="bladder,anorectum,ctvn")
    crossval.add_argument("--support-set-size", type=int, default=32)
    crossval.add_argument("--support-size", type=int, default=None)
    crossval.add_argument("--weights", type=Path, default=None)
    crossval.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    crossval.add_argument("--tolerance-mm", default=None)
    crossval.add_argument("--out", type=Path, required=True)
    crossval.set_defaults(handler=cmd_crossval)


def cmd_crossval(args: argparse.Namespace) -> int:
    from app.catalogue import parse_structures
    from app.evaluation.crossval import cross_validate
    from app.evaluation.evaluate import parse_tolerances

    records = cross_validate([tuple(c) for c in args.case], parse_structures(args.structures), args.out,
                             weights=args.weights, phantoms=args.phantoms, support_set_size=args.support_set_size,
                             support_size=args.support_size, tolerances_mm=parse_tolerances(args.tolerance_mm),
                             device=args.device)
    print((args.out / "metrics.md").read_text())
    print(f"{len(records)} records written to {args.out}")
    return 0


def _training_options(parser: argparse.ArgumentParser, steps: int, patience: int | None = None) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, log, curves, weights")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--support-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4 if patience is None else 1e-4)
    parser.add_argument("--low-res-steps", type=int, default=0, help="first steps at 64x64 (cheap curriculum)")
    parser.add_argument("--heldout", default="", help="comma-separated label names never trained on (validation)")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--patience", type=int, default=patience,
                        help="validations without improvement before stopping")
    parser.add_argument("--max-seconds", type=float, default=None, help="training time budget")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--negative-share", type=float, default=0.1,
                        help="share of whole-view queries that are empty slices beyond the structure (default 0.1)")
    parser.add_argument("--negative-reach", type=int, default=6,
                        help="empty queries at most this many slices beyond the structure (default 6); 0: anywhere "
                             "in the volume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    parser.add_argument("--quiet", action="store_true")


def _train_config(args: argparse.Namespace):
    from app.training.train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, support_size=args.support_size,
                       learning_rate=args.lr, low_res_steps=args.low_res_steps,
                       heldout_structures=[s for s in args.heldout.split(",") if s],
                       validate_every=args.validate_every, checkpoint_every=args.checkpoint_every,
                       patience=args.patience, max_seconds=args.max_seconds, seed=args.seed, device=args.device,
                       negative_share=args.negative_share, negative_reach=args.negative_reach or None)


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour train`: its arguments, beside its handler."""
    train = commands.add_parser("train", help="train the in-context network (episodic)",
                                description="Episodic in-context training (see app/training): cross-patient "
                                            "episodes on the labels and HU tasks of the given CTs, their virtual "
                                            "patients (--recipe) and synthetic phantoms. With --from, the starting "
                                            "weights are validated first (step 0). Resumes from OUT/checkpoint.pt.")
    train.add_argument("--case", nargs=2, metavar=("CT", "LABELS"), type=Path, action="append", default=[],
                       help="a CT and its label map (labels.json beside it names the values); repeatable")
    train.add_argument("--phantoms", type=int, default=12, help="synthetic phantom volumes to add (default 12)")
    train.add_argument("--recipe", type=Path, default=None,
                       help="a training-data recipe (JSON, app/training/data.py: TrainingDataRecipe) instead of "
                            "--case/--phantoms: real cases, their virtual patients, HU tasks, crops")
    train.add_argument("--workers", type=int, default=1, help="processes preparing the data (default 1)")
    train.add_argument("--data", type=Path, default=None, help="a prepared data file instead of --case/--phantoms")
    train.add_argument("--save-data", type=Path, default=None, help="write the prepared data file here")
    train.add_argument("--prepare-only", action="store_true", help="only prepare --save-data, do not train")
    train.add_argument("--from", dest="init", type=Path, default=None, help="start from this checkpoint")
    train.add_argument("--name", default=None, help="model name in the weights' card (default: autocontour-<OUT>)")
    train.add_argument("--licence", default=None,
                       help="licence of the weights, which follows the training data's (default: says so); "
                            "weights from research-only --from weights stay research-only whatever this says")
    _training_options(train, steps=6000)
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from app.errors import OptionError
    from app.training.train import train

    data = args.data
    if data is None:
        from collections.abc import Sequence

        from app.training.data import (  # needs SimpleITK
            Draw,
            Volume,
            load_recipe,
            phantom_volumes,
            prepare_training_data,
            volume_from_files,
        )

        volumes: Sequence[Volume | Draw]
        if args.recipe is not None:
            recipe, root = load_recipe(args.recipe)
            missing = [str(root / c.ct) for c in recipe.cases if not (root / c.ct).exists()]
            if missing:
                raise OptionError(f"the recipe's CT {missing[0]} is not there")
            volumes = recipe.items(root)
        elif args.case or args.phantoms:
            volumes = [volume_from_files(ct, labels, None, f"case{i}", "user-supplied", "see the data's own licence")
                       for i, (ct, labels) in enumerate(args.case)] + phantom_volumes(args.phantoms)
        else:
            raise OptionError("give --recipe FILE, --case CT LABELS, --phantoms N or --data FILE")
        data = prepare_training_data(volumes, args.save_data or args.out / "training_data.safetensors",
                                     workers=args.workers)
        print(f"training data: {data}")
    if args.prepare_only:
        return 0
    config = _train_config(args)
    card = {key: value for key, value in (("name", args.name), ("licence", args.licence)) if value}
    scores = train(data, args.out, config, init=args.init, resume=not args.no_resume, progress=not args.quiet,
                   card=card)
    print(json.dumps(scores, indent=1))
    print(f"weights: {args.out / 'final.safetensors'} (best validation: {args.out / 'best.safetensors'})")
    return 0


def add_finetune_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour finetune`: its arguments, beside its handler."""
    finetune = commands.add_parser("finetune", help="adapt a checkpoint to a clinic's labelled cases",
                                   description="Transfer learning: start from a compatible checkpoint (the project's, "
                                               "the official one or your own) and fine-tune on your cases' "
                                               "structures, with early stopping on a held-out case.")
    finetune.add_argument("--from", dest="init", type=Path, required=True, help="starting checkpoint")
    finetune.add_argument("--case", nargs=2, metavar=("CT", "LABELS"), type=Path, action="append", required=True,
                          help="a CT and its label map or mask; at least two cases")
    finetune.add_argument("--structures", required=True,
                          help="structures to learn, each made by its shipped recipe (or --label for one structure)")
    finetune.add_argument("--label", type=int, default=None, help="label value of the single structure in the masks")
    finetune.add_argument("--holdout-case", type=int, default=-1, help="index of the case kept for early stopping "
                                                                         "(default: the last)")
    _training_options(finetune, steps=1000, patience=5)
    finetune.set_defaults(handler=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from app.catalogue import parse_structures
    from app.errors import OptionError
    from app.training.finetune import finetune

    if len(args.case) < 2:
        raise OptionError("fine-tuning needs at least two cases: one is held out for early stopping")
    names = parse_structures(args.structures)
    scores = finetune(args.init, [tuple(c) for c in args.case], names, args.out, _train_config(args),
                      label=args.label, holdout_case=args.holdout_case, progress=not args.quiet)
    print(json.dumps(scores, indent=1))
    print(f"weights: {args.out / 'best.safetensors'} (use with --weights)")
    return 0


def _progress_bar(quiet: bool):
    """A tqdm bar per phase; returns (callback, close)."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(phase: str, done: dict[str, int], total: dict[str, int]) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.close()
            bars[phase] = tqdm(total=sum(total.values()), desc=f"{phase} pass", unit="slice", file=sys.stderr)
        bar = bars[phase]
        bar.update(sum(done.values()) - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def add_segment_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour segment`: its arguments, beside its handler."""
    seg = commands.add_parser("segment", help="segment a CT volume into draft masks",
                              description="Segment a CT (NIfTI, or a DICOM series as a folder or zip) and write one "
                                          "NIfTI mask per structure on the CT's grid, summary.json (confidence, "
                                          "flagged slices, volumes, provenance) and preview.png (DICOM input: also "
                                          "rtstruct.dcm and seg.dcm). Results are drafts for clinical review.")
    seg.add_argument("ct", type=Path, help="CT volume in Hounsfield units (.nii or .nii.gz), or a DICOM CT series "
                                           "(a folder or a .zip); DICOM input also gives rtstruct.dcm and seg.dcm")
    seg.add_argument("--out", type=Path, required=True, help="output folder")
    seg.add_argument("--structures", default=None, help=_structures_help())
    _inference_options(seg)
    seg.add_argument("--series", default=None, metavar="UID",
                     help="DICOM input holding several CT series: the Series Instance UID of the one to segment")
    _roi_names_option(seg)
    seg.add_argument("--probabilities", action="store_true", help="also write <structure>_prob.nii.gz")
    seg.add_argument("--no-preview", action="store_true", help="skip preview.png")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(handler=cmd_segment)


def cmd_segment(args: argparse.Namespace) -> int:
    from app.catalogue import parse_structures
    from app.errors import InputImageError

    if args.structures is not None:  # cheap checks before the model loads (the loaded sets decide the rest)
        parse_structures(args.structures)
    if not args.ct.exists():
        raise InputImageError(f"file not found: {args.ct}")
    segmenter = _segmenter(args)
    update, close = _progress_bar(args.quiet)
    try:
        result = segmenter.segment(
            args.ct, args.out, args.structures, **_segment_options(args),
            save_probabilities=args.probabilities, preview=not args.no_preview, progress=update,
            roi_names=args.roi_names, series_uid=args.series)
    finally:
        close()
    summary = result.summary
    for notice in summary["notices"]:
        print(f"NOTICE: {notice}", file=sys.stderr)
    print(f"DRAFT contours for clinical review, written to {args.out}")
    for _name, s in summary["structures"].items():
        conf = "n/a" if s["confidence"] is None else f"{s['confidence']:.2f}"
        reason = f"  ({s['status_reason']})" if s["status_reason"] else ""
        print(f"  {s['display_name']:<16} {s['status']:<6} {s['volume_ml']:>9.1f} mL  confidence {conf}  "
              f"{len(s['flagged_slices'])} flagged slice(s){reason}")
    print(f"  total {summary['timings_s']['total']:.1f} s on {summary['model']['device']}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def add_support_commands(commands: argparse._SubParsersAction) -> None:
    """`autocontour support build` and `support list`: their arguments, beside their handlers."""
    support = _command_group(commands, "support", "build and list support sets")
    build = support.add_parser("build", help="build a support set from contoured CTs (NIfTI or DICOM + RTSTRUCT)",
                               description="Pick informative slices of one structure from contoured CTs, spread "
                                           "over its axial extent, and save them as a hash-addressed support set "
                                           "with a manifest (declaring the structure) and preview.png. Cases come "
                                           "from files (--case), a PACS (--pacs-url/--study) or a reviewed, "
                                           "corrected result (--from-result/--mask).")
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
    build.set_defaults(handler=cmd_support_build)
    listing = support.add_parser("list", help="list the support sets that segment would use")
    listing.add_argument("--support-dir", type=Path, action="append", default=[])
    listing.add_argument("--no-shipped-support", action="store_true")
    listing.set_defaults(handler=cmd_support_list)


def _definition_from_args(args: argparse.Namespace, structure: str, base=None):
    """The structure definition the user declared: flags over the base (a result's, a built-in, or a plain organ)."""
    from pydantic import ValidationError

    from app.catalogue import default_definition
    from app.errors import OptionError

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
    import tempfile

    from app.catalogue import parse_structures
    from app.config import Settings
    from app.errors import OptionError
    from app.support.build import build_support_set, result_case
    from app.support.recipes import Recipe

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
            from app.dicom import pacs

            client = pacs.connect(args.pacs_url, args.username, _pacs_password(args))
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
    from app.config import Settings
    from app.support.store import discover

    settings = Settings()
    found = discover(settings.support_folders(args.support_dir, False if args.no_shipped_support else None))
    for structure, support in found.items():
        print(f"{structure:<16} {support.id}  {len(support):>3} slices  {len(support.manifest.source_cases)} case(s)  "
              f"{support.path}")
    return 0


def add_weights_commands(commands: argparse._SubParsersAction) -> None:
    """`autocontour weights download`, `info` and `interpolate`: their arguments, beside their handlers."""
    weights = _command_group(commands, "weights", "download or inspect checkpoints")
    download = weights.add_parser("download", help="fetch a known checkpoint into the cache",
                                  description="Download a known checkpoint, verify its SHA-256 and that it loads, "
                                              "and store it in the cache folder. universeg-v1 is the official "
                                              "UniverSeg checkpoint: research use only (OpenRAIL++-M).")
    download.add_argument("name", choices=["universeg-v1"])
    download.add_argument("--sha256", default=None, help="expected SHA-256 (pins the download)")
    download.add_argument("--url", default=None, help="alternative URL (a mirror)")
    download.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/autocontour/weights")
    download.add_argument("--quiet", action="store_true")
    download.set_defaults(handler=cmd_weights_download)
    info = weights.add_parser("info", help="show a checkpoint's model card")
    info.add_argument("file", type=Path, nargs="?", default=None, help="default: the shipped checkpoint")
    info.set_defaults(handler=cmd_weights_info)
    mix = weights.add_parser("interpolate", help="blend two checkpoints of one architecture (WiSE-FT)",
                             description="Write (1 - SHARE) x START + SHARE x END, weight by weight: a fine-tuned "
                                         "checkpoint blended with its starting point keeps much of both (how the "
                                         "shipped v2 was made, see models/MODEL_CARD.md). Research-only inputs give "
                                         "research-only output.")
    mix.add_argument("start", type=Path)
    mix.add_argument("end", type=Path)
    mix.add_argument("--share", type=float, required=True, help="weight of END, 0 to 1")
    mix.add_argument("--out", type=Path, required=True)
    mix.add_argument("--name", default=None, help="model name in the card")
    mix.add_argument("--version", default=None, help="version in the card")
    mix.add_argument("--description", default=None, help="description in the card")
    mix.set_defaults(handler=cmd_weights_interpolate)


def cmd_weights_download(args: argparse.Namespace) -> int:
    from app.config import Settings
    from app.model.weights import KNOWN_WEIGHTS, RESEARCH_ONLY_NOTICE, download

    known = KNOWN_WEIGHTS[args.name]
    path, digest = download(known, args.cache_dir or Settings().weights_cache, sha256=args.sha256, url=args.url,
                            progress=not args.quiet)
    print(f"{path}\nsha256 {digest}")
    if not (args.sha256 or known.sha256):
        print("warning: no SHA-256 was given to pin this download; record the one above", file=sys.stderr)
    if known.research_only:
        print(f"NOTICE: {RESEARCH_ONLY_NOTICE}", file=sys.stderr)
    return 0


def cmd_weights_info(args: argparse.Namespace) -> int:
    from app.config import Settings
    from app.model.weights import load_model

    _, card = load_model(args.file or Settings().default_weights)
    print(card.model_dump_json(indent=1))
    return 0


def cmd_weights_interpolate(args: argparse.Namespace) -> int:
    from app.errors import OptionError
    from app.model.weights import interpolate, save_checkpoint

    try:
        model, card = interpolate(args.start, args.end, args.share)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    updates = {key: value for key, value in (("name", args.name), ("version", args.version),
                                             ("description", args.description)) if value}
    print(f"{args.out}\nsha256 {save_checkpoint(model, args.out, card.model_copy(update=updates))}")
    return 0


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour serve`: its arguments, beside its handler."""
    serve = commands.add_parser("serve", help="run the HTTP service",
                                description="Start the FastAPI server (uvicorn). Settings: AUTOCONTOUR_* variables "
                                            "and the TOML file named by AUTOCONTOUR_CONFIG (see README).")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.server.main import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, access_log=False, log_config=None)
    return 0


def add_worker_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour worker`: its arguments, beside its handler."""
    worker = commands.add_parser("worker", help="run a Celery worker that owns one model (AUTOCONTOUR_QUEUE=celery)",
                                 description="Load the model once and run segmentation tasks from the Redis broker "
                                             "(AUTOCONTOUR_BROKER_URL). Start one per GPU; the API runs with "
                                             "AUTOCONTOUR_QUEUE=celery and the same AUTOCONTOUR_DATA_DIR (shared).")
    worker.add_argument("--name", default=None, help="worker node name (default: autocontour-PID@HOST)")
    worker.set_defaults(handler=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    import os
    import socket

    from app.pipeline import Segmenter
    from app.server.celery_queue import worker_app
    from app.server.context import configure_logging
    from app.server.settings import ServerSettings

    configure_logging()
    settings = ServerSettings()
    segmenter = Segmenter(settings)
    if settings.warmup:
        segmenter.warm_up()
    app = worker_app(settings, segmenter)
    name = args.name or f"autocontour-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO", f"--hostname={name}",
                     "--without-gossip", "--without-mingle"])
    return 0


def add_submit_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour submit`: its arguments, beside its handler."""
    submit = commands.add_parser("submit", help="send a CT to a server and download the draft contours",
                                 description="Upload a CT to an autocontour server, follow its progress, and unpack "
                                             "the result (masks, summary.json, preview.png) into --out. Retries on "
                                             "connection errors and a full queue.")
    submit.add_argument("ct", type=Path)
    submit.add_argument("--server", required=True, help="base URL, e.g. http://autocontour:8000")
    submit.add_argument("--out", type=Path, required=True)
    submit.add_argument("--structures", default=None)
    submit.add_argument("--support-size", type=int, default=None)
    submit.add_argument("--ensemble", type=int, default=None)
    submit.add_argument("--threshold", type=float, default=None)
    submit.add_argument("--probabilities", action="store_true")
    submit.add_argument("--api-key", default=None, help="default: $AUTOCONTOUR_API_KEY")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result")
    submit.add_argument("--quiet", action="store_true")
    submit.set_defaults(handler=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    import os

    import httpx

    from app.client import Client, ServerError
    from app.errors import InputImageError, OptionError

    if not args.ct.is_file():
        raise InputImageError(f"file not found: {args.ct}")
    key = args.api_key or os.environ.get("AUTOCONTOUR_API_KEY")
    last = [""]

    def show(job: dict) -> None:
        p = job.get("progress") or {}
        line = f"{job['status']}" + (f" {p['phase']} {p['slices_done']}/{p['slices_total']} slices"
                                     if p.get("slices_total") else "")
        if line != last[0] and not args.quiet:
            print(line, file=sys.stderr)
            last[0] = line

    try:
        with Client(args.server, key) as client:
            job = client.submit(args.ct, args.structures, args.support_size, args.ensemble, args.threshold,
                                args.probabilities)
            job = client.wait(job["id"], timeout_s=args.timeout, progress=show)
            if job["status"] != "done":
                detail = (job.get("error") or {}).get("detail", job["status"])
                raise OptionError(f"job {job['id']} {job['status']}: {detail}")
            files = client.download(job["id"], args.out)
    except ServerError as exc:
        raise OptionError(f"server refused: {exc}") from exc
    except httpx.HTTPError as exc:
        raise OptionError(f"cannot reach {args.server}: {exc}") from exc
    print(f"DRAFT contours for clinical review: {len(files)} files in {args.out} (job {job['id']})")
    return 0


def add_pacs_commands(commands: argparse._SubParsersAction) -> None:
    """`autocontour pacs pull` and `pacs push`: their arguments, beside their handlers."""
    pacs = _command_group(commands, "pacs", "pull a CT from a DICOMweb PACS and push results back")
    pull = pacs.add_parser("pull", help="fetch a study's CT series (QIDO/WADO-RS), segment it, optionally push back",
                           description="Fetch the CT series of a study from a DICOMweb server, segment it, write "
                                       "NIfTI masks, rtstruct.dcm and seg.dcm to --out, and with --push store the "
                                       "RTSTRUCT and SEG back into the study (STOW-RS). Results are drafts.")
    pull.add_argument("--url", required=True, help="DICOMweb root, e.g. http://orthanc:8042/dicom-web")
    pull.add_argument("--study", required=True, help="Study Instance UID")
    pull.add_argument("--series", default=None, help="Series Instance UID (needed when the study has several CTs)")
    pull.add_argument("--out", type=Path, required=True)
    pull.add_argument("--push", action="store_true", help="store the RTSTRUCT and SEG back into the PACS")
    pull.add_argument("--structures", default=None, help=_structures_help())
    _inference_options(pull)
    _roi_names_option(pull)
    pull.add_argument("--username", default=None)
    pull.add_argument("--password", default=None, help="default: $AUTOCONTOUR_PACS_PASSWORD")
    pull.set_defaults(handler=cmd_pacs_pull)
    push = pacs.add_parser("push", help="store DICOM files (an RTSTRUCT, a SEG) into a DICOMweb PACS")
    push.add_argument("--url", required=True)
    push.add_argument("files", type=Path, nargs="+")
    push.add_argument("--username", default=None)
    push.add_argument("--password", default=None)
    push.set_defaults(handler=cmd_pacs_push)


def _pacs_password(args: argparse.Namespace) -> str | None:
    """--password, else AUTOCONTOUR_PACS_PASSWORD (keeps it out of shell history and process lists)."""
    import os

    return args.password or os.environ.get("AUTOCONTOUR_PACS_PASSWORD")


def cmd_pacs_pull(args: argparse.Namespace) -> int:
    import tempfile

    from app.dicom import pacs

    client = pacs.connect(args.url, args.username, _pacs_password(args))
    series_uid = pacs.find_ct_series(client, args.study, args.series)
    segmenter = _segmenter(args)
    with tempfile.TemporaryDirectory(prefix="autocontour-pacs-") as tmp:
        files = pacs.fetch_series(client, args.study, series_uid, Path(tmp))
        print(f"fetched {len(files)} slices of series {series_uid}", file=sys.stderr)
        result = segmenter.segment(Path(tmp), args.out, args.structures, **_segment_options(args),
                                   roi_names=args.roi_names)
    outputs = [result.files[k] for k in ("rtstruct", "seg") if k in result.files]
    if args.push and outputs:
        pacs.store(client, outputs)
        print(f"stored {', '.join(p.name for p in outputs)} in study {args.study}")
    print(f"DRAFT contours for clinical review, written to {args.out}")
    return 0


def cmd_pacs_push(args: argparse.Namespace) -> int:

    from app.dicom import pacs
    from app.errors import InputImageError

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise InputImageError(f"file not found: {', '.join(missing)}")
    client = pacs.connect(args.url, args.username, _pacs_password(args))
    pacs.store(client, list(args.files))
    print(f"stored {len(args.files)} file(s)")
    return 0


def add_keys_commands(commands: argparse._SubParsersAction) -> None:
    """`autocontour keys hash`: its arguments, beside its handler."""
    keys = _command_group(commands, "keys", "API-key helpers")
    key_hash = keys.add_parser("hash", help="print the SHA-256 to configure for an API key")
    key_hash.add_argument("key", nargs="?", default=None, help="the key (default: read from stdin)")
    key_hash.set_defaults(handler=cmd_keys_hash)


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from app.server.auth import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0


def _pid1_is_worker() -> bool:
    try:
        argv = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"autocontour") for a in argv) and b"worker" in argv


def add_health_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour health`: its arguments, beside its handler."""
    health = commands.add_parser("health", help="container health check: the API answers, or a worker reaches "
                                                "its broker",
                                 description="Exit 0 when healthy, 1 with one line otherwise. A worker container "
                                             "(PID 1 runs `autocontour worker`, or --worker) is healthy when it "
                                             "reaches its Redis broker; otherwise the API must answer --url.")
    health.add_argument("--url", default="http://127.0.0.1:8000/healthz")
    health.add_argument("--worker", action="store_true", help="check the broker (default: when PID 1 is a worker)")
    health.set_defaults(handler=cmd_health)


def cmd_health(args: argparse.Namespace) -> int:
    try:
        if args.worker or _pid1_is_worker():
            from kombu import Connection

            from app.server.settings import ServerSettings

            with Connection(ServerSettings().broker_url, connect_timeout=4) as connection:
                connection.ensure_connection(max_retries=1, timeout=4)
            print("healthy: broker reachable")
        else:
            import httpx

            httpx.get(args.url, timeout=4).raise_for_status()
            print(f"healthy: {args.url} answers")
        return 0
    except Exception as exc:  # any failure is "unhealthy", said in one line
        print(f"autocontour: unhealthy: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 1


def add_structures_command(commands: argparse._SubParsersAction) -> None:
    """`autocontour structures`: its arguments, beside its handler."""
    structures = commands.add_parser("structures", help="list the structures the support sets provide, and the "
                                                        "overlap rules",
                                     description="The structures the loaded support sets declare (and the built-in "
                                                 "cervix ones without a set), with how to add one.")
    structures.add_argument("--support-dir", type=Path, action="append", default=[])
    structures.add_argument("--no-shipped-support", action="store_true")
    structures.add_argument("--rules", type=Path, default=None, help="overlap-rules JSON (default: shipped)")
    structures.set_defaults(handler=cmd_structures)


def cmd_structures(args: argparse.Namespace) -> int:
    from app.catalogue import Catalogue
    from app.config import Settings
    from app.rules import load_rules
    from app.support.store import discover

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except AutocontourError as exc:
        print(f"autocontour: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:
        # an AUTOCONTOUR_* setting that does not parse; pydantic is not imported for commands that need
        # no settings (health checks run often), so it is looked up rather than imported here
        pydantic = sys.modules.get("pydantic")
        if pydantic is None or not isinstance(exc, pydantic.ValidationError):
            raise
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        print(f"autocontour: error: setting {field!r} (AUTOCONTOUR_{field.upper()}): {first['msg']}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autocontour: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
