"""The generated reference pages: docs/cli.md from the argparse parser, docs/configuration.md from the settings.

    python -m autocontour.cli.reference            # rewrite both pages
    python -m autocontour.cli.reference --check    # exit 1 if either page is stale

tests/test_docs.py fails when a page differs from what this prints, so the pages
stay in step with the code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REGENERATE = "python -m autocontour.cli.reference"
WIDTH = 100  # usage lines are wrapped at a fixed width, whatever the terminal


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) of a parser's subcommands, in the order `--help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return []


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _option_name(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"`{name}`" for name in action.option_strings)
        if action.nargs == 0:
            return names
        metavar = argparse.HelpFormatter(prog="")._format_args(action, action.dest.upper())
        return f"{names} `{metavar}`"
    return f"`{action.metavar or action.dest}`"


def _option_help(action: argparse.Action) -> str:
    text = (action.help or "") % {"default": action.default, "prog": ""} if action.help else ""
    extras = []
    if action.default not in (None, False, [], "", argparse.SUPPRESS) and "default" not in text:
        extras.append(f"default: {action.default}")
    if action.required and action.option_strings:
        extras.append("required")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in text:
        extras.append("repeatable")
    text = "; ".join(part for part in [text, *extras] if part)
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _command_section(name: str, parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{name}`", ""]
    if parser.description or summary:
        lines += [parser.description or summary[:1].upper() + summary[1:] + ".", ""]
    lines += ["```text", _usage(parser), "```", ""]
    actions = [action for action in parser._actions
               if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)]
    if actions:
        lines += ["| argument | meaning |", "| --- | --- |"]
        lines += [f"| {_option_name(action)} | {_option_help(action)} |" for action in actions]
        lines.append("")
    for sub_name, sub, sub_summary in _subcommands(parser):
        lines += _command_section(f"{name} {sub_name}", sub, sub_summary, level + 1)
    return lines


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The page docs/cli.md: every command and subcommand, its usage and its options with their help."""
    if parser is None:
        from autocontour.cli import build_parser

        parser = build_parser()
    commands = _subcommands(parser)
    lines = [
        "# Command line",
        "",
        f"<!-- Generated from the argparse parser by `{REGENERATE}`. Do not edit by hand: edit the help",
        "     texts in autocontour/cli/. -->",
        "",
        parser.description or "",
        "",
        "Every mistake in the input (a missing, empty, truncated or non-NIfTI file, a 2D or 4D image, NaNs, "
        "absurd spacing, an image that is not a CT in Hounsfield units, an unknown structure, a bad option) "
        "ends with exit code 2 and one line on stderr that names it. A result ends with exit code 0. "
        "Settings that are not options are `AUTOCONTOUR_*` variables: see [configuration](configuration.md).",
        "",
        "| command | what |",
        "| --- | --- |",
    ]
    lines += [f"| [`{name}`](#{_anchor(name)}) | {summary} |" for name, _, summary in commands]
    lines.append("")
    for name, sub, summary in commands:
        lines += _command_section(f"autocontour {name}", sub, summary, 2)
    return "\n".join(lines).rstrip("\n") + "\n"


def _anchor(name: str) -> str:
    """GitHub's anchor for the heading "`autocontour NAME`"."""
    return "autocontour-" + name.replace(" ", "-")


def pages() -> dict[str, Callable[[], str]]:
    """Each generated page (relative to the repository root) and the function that writes its text."""
    from autocontour.cli.settings import settings_markdown

    return {"docs/cli.md": cli_markdown, "docs/configuration.md": settings_markdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Regenerate docs/cli.md and "
                                                                  "docs/configuration.md.")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2],
                        help="repository root (default: the checkout this package is in)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    args = parser.parse_args(argv)
    stale = []
    for relative, generate in pages().items():
        path, text = args.root / relative, generate()
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(relative)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    for relative in stale:
        print(f"{relative}: {'stale' if args.check else 'rewritten'}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
