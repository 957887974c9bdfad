"""What every command shares: one-line usage errors, the inference options of the commands that run
the network, and the progress bar."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from autocontour.options import SegmentOptions

if TYPE_CHECKING:
    from autocontour.pipeline.summary import Summary

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


def add_command(commands: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int],
                help: str) -> argparse.ArgumentParser:
    """A command (or a group's subcommand) run by `handler`, whose docstring is its --help description: what a
    command does is said once, beside the code that does it. The docstring's lines are joined into one
    paragraph (argparse wraps it again; docs/cli.md prints it as one line)."""
    doc = inspect.getdoc(handler)
    parser = commands.add_parser(name, help=help, description=" ".join(doc.split()) if doc else None)
    parser.set_defaults(handler=handler)
    return parser


def described(option: str) -> str:
    """An option's help: its description in SegmentOptions, so the CLI and the API say the same."""
    return SegmentOptions.model_fields[option].description or ""


def choices(option: str) -> list[str]:
    """The values an option of SegmentOptions takes (its Literal)."""
    return list(get_args(SegmentOptions.model_fields[option].annotation))


def structures_help() -> str:
    return f"comma-separated {described('structures')}"


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
                        help=described("support_size"))
    parser.add_argument("--ensemble", type=int, default=None,
                        help=described("ensemble"))
    parser.add_argument("--threshold", type=float, default=None, help=described("threshold"))
    parser.add_argument("--support-dir", type=Path, action="append", default=[],
                        help="folder of support sets (a clinic's own); overrides shipped sets of the same structure; "
                             "repeatable")
    parser.add_argument("--no-shipped-support", action="store_true", help="use only the --support-dir sets")
    parser.add_argument("--rules", type=Path, default=None,
                        help="overlap-rules JSON (default: $AUTOCONTOUR_RULES, else the shipped cervix rules)")
    parser.add_argument("--axial-search", choices=choices("axial_search"), default="coarse",
                        help=described("axial_search"))
    parser.add_argument("--support-selection", choices=choices("support_selection"), default="level",
                        help=described("support_selection"))
    parser.add_argument("--no-registration", action="store_true",
                        help="do not register the support sets' source cases to the scan (no registration prior: "
                             "the bone profile and a coarse search find each structure)")
    parser.add_argument("--crops", action="store_true",
                        help=described("crops"))
    parser.add_argument("--planes", choices=choices("planes"), default="axial",
                        help=described("planes"))
    parser.add_argument("--prior-weight", type=float, default=None,
                        help=described("prior_weight"))


def roi_names_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roi-names", choices=choices("roi_names"), default="display",
                        help=described("roi_names"))


def segmenter_from(args: argparse.Namespace):
    """The Segmenter the inference options ask for."""
    from autocontour.pipeline import Segmenter

    return Segmenter(weights=args.weights, device=args.device, precision=args.precision,
                     support_dirs=args.support_dir, shipped_support=False if args.no_shipped_support else None,
                     rules=args.rules)


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The one place command-line flags become SegmentOptions (every command that runs the network): each
    flag's destination is the option's name, but for the negated --no-registration and --no-preview."""
    given = vars(args)
    values = {name: given[name] for name in SegmentOptions.model_fields if name in given}
    values["registration"] = not args.no_registration
    if "no_preview" in given:
        values["preview"] = not args.no_preview
    return SegmentOptions.checked(values)


def progress_bar(quiet: bool):
    """A line per stage and a tqdm bar per network pass, on stderr; returns (callback, close)."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(phase: str, done: dict[str, int], total: dict[str, int]) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.close()
            if not total:  # a stage with nothing to count: its name, and how long it took once the next begins
                bars[phase] = tqdm(desc=phase, bar_format="{desc} ({elapsed})", file=sys.stderr)
                return
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


def print_report(summary: Summary, out: Path) -> None:
    """What `segment` and `pacs pull` print at the end: the draft notice and one line per structure."""
    for notice in summary.notices:
        print(f"NOTICE: {notice}", file=sys.stderr)
    print(f"DRAFT contours for clinical review, written to {out}")
    for s in summary.structures.values():
        conf = "n/a" if s.confidence is None else f"{s.confidence:.2f}"
        reason = f"  ({s.status_reason})" if s.status_reason else ""
        print(f"  {s.display_name:<16} {s.status:<6} {s.volume_ml:>9.1f} mL  confidence {conf}  "
              f"{len(s.flagged_slices)} flagged slice(s){reason}")
    print(f"  total {summary.timings_s['total']:.1f} s on {summary.model.device}")
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
