"""What every command shares: one-line usage errors, the inference options of the commands that run
the network, and the progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2




class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as a single line (and exit code 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_BAD_INPUT)


def command_group(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A command with subcommands of its own (`autocontour NAME SUBCOMMAND`); one is required."""
    return commands.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True,
                                                               parser_class=OneLineParser)


def structures_help() -> str:
    from autocontour.catalogue import DEFAULT_STRUCTURES

    return (f"comma-separated names of structures the loaded support sets provide (`autocontour structures`; "
            f"default: {','.join(DEFAULT_STRUCTURES)} where loaded, else every loaded set)")


def inference_options(parser: argparse.ArgumentParser) -> None:
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


def roi_names_option(parser: argparse.ArgumentParser) -> None:
    from autocontour.dicom import ROI_NAME_STYLES

    parser.add_argument("--roi-names", choices=ROI_NAME_STYLES, default="display",
                        help="ROI names in rtstruct.dcm: the catalogue's display names (default) or TG-263 names "
                             "(the display name where a structure has none)")


def segmenter_from(args: argparse.Namespace):
    """The Segmenter the inference options ask for."""
    from autocontour.pipeline import Segmenter

    return Segmenter(weights=args.weights, device=args.device, precision=args.precision,
                     support_dirs=args.support_dir, shipped_support=False if args.no_shipped_support else None,
                     rules=args.rules)


def segment_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of Segmenter.segment that the inference options set."""
    return {"support_size": args.support_size, "ensemble": args.ensemble, "threshold": args.threshold,
            "axial_search": args.axial_search, "support_selection": args.support_selection,
            "registration": not args.no_registration, "prior_weight": args.prior_weight, "crops": args.crops,
            "planes": args.planes}


def progress_bar(quiet: bool):
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


def pacs_password(args: argparse.Namespace) -> str | None:
    """--password, else AUTOCONTOUR_PACS_PASSWORD (keeps it out of shell history and process lists)."""
    import os

    return args.password or os.environ.get("AUTOCONTOUR_PACS_PASSWORD")
