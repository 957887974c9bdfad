"""The `autocontour` command line: a module per command group, each parser beside its handler.

argparse, because hospital scripts need exact, stable behaviour: every
mistake in the input ends with exit code 2 and one line on stderr that names
it; a result always ends with exit code 0. Heavy imports (torch) happen inside
the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys

from autocontour import __version__
from autocontour.cli import evaluate, pacs, propagate, segment, service, settings, support, training, weights
from autocontour.cli.parsing import EXIT_BAD_INPUT, OneLineParser
from autocontour.errors import AutocontourError

# in the order `autocontour --help` lists them
COMMANDS = (segment.add_segment_command, propagate.add_propagate_command, support.add_support_commands,
            weights.add_weights_commands, evaluate.add_evaluate_command, evaluate.add_crossval_command,
            training.add_train_command, training.add_finetune_command, service.add_serve_command,
            service.add_worker_command,
            service.add_submit_command, pacs.add_pacs_commands, service.add_keys_commands,
            service.add_health_command, segment.add_structures_command, settings.add_settings_command)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="autocontour",
        description="Few-shot, in-context draft contours for cervical-cancer radiotherapy planning CT. "
                    "Every output is a DRAFT for review by a qualified clinician.")
    parser.add_argument("--version", action="version", version=f"autocontour {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in COMMANDS:
        add(commands)
    return parser


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
