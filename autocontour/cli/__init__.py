"""The `autocontour` command line: a module per command group, each parser beside its handler.

argparse, because hospital scripts need exact, stable behaviour: every
mistake in the input ends with exit code 2 and one line on stderr that names
it; a result always ends with exit code 0. Heavy imports (torch) happen inside
the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autocontour import __version__, scratch
from autocontour.cli import evaluate, pacs, propagate, refine, segment, service, settings, support, training, weights
from autocontour.cli.parsing import EXIT_BAD_INPUT, OneLineParser
from autocontour.errors import AutocontourError

# in the order `autocontour --help` lists them
COMMANDS = (segment.add_segment_command, propagate.add_propagate_command, refine.add_refine_command,
            support.add_support_commands,
            weights.add_weights_commands, evaluate.add_evaluate_command, evaluate.add_crossval_command,
            training.add_train_command, training.add_finetune_command, service.add_serve_command,
            service.add_worker_command,
            service.add_submit_command, pacs.add_pacs_commands, service.add_keys_commands,
            service.add_health_command, segment.add_structures_command, settings.add_settings_command)


# commands that hold no patient data on disk (serve and worker keep their own scratch under the data folder)
NO_SCRATCH = frozenset({"serve", "worker", "health", "keys", "settings", "structures", "weights"})


@contextmanager
def command_scratch(command: str) -> Iterator[None]:
    """Every temporary file of the command (an extracted DICOM zip, a PACS download) in a folder this process
    owns and locks, removed on any exit Python sees (SIGTERM included), and swept by the next run when the
    process was killed outright: patient data never stays behind in the system's temporary folder."""
    if command in NO_SCRATCH:
        yield
        return
    root = Path(os.environ.get("AUTOCONTOUR_SCRATCH_DIR") or tempfile.gettempdir()) / "autocontour-cli"
    scratch.sweep(root)
    own = scratch.Scratch(root)
    saved = os.environ.get("AUTOCONTOUR_SCRATCH_DIR"), tempfile.tempdir
    os.environ["AUTOCONTOUR_SCRATCH_DIR"] = tempfile.tempdir = str(own.path)
    handler = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _in_main_thread() else None
    try:
        yield
    finally:
        _restore("AUTOCONTOUR_SCRATCH_DIR", saved[0])
        tempfile.tempdir = saved[1]
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        own.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that remove patient data


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(variable: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = value


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
        with command_scratch(args.command):
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
