"""`autocontour weights download`, `info` and `interpolate`: checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontour.cli.parsing import add_command, command_group


def add_weights_commands(commands: argparse._SubParsersAction) -> None:
    weights = command_group(commands, "weights", "download or inspect checkpoints")
    download = add_command(weights, "download", cmd_weights_download, help="fetch a known checkpoint into the cache")
    download.add_argument("name", choices=["universeg-v1"])
    download.add_argument("--sha256", default=None, help="expected SHA-256 (pins the download)")
    download.add_argument("--url", default=None, help="alternative URL (a mirror)")
    download.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/autocontour/weights")
    download.add_argument("--quiet", action="store_true")
    info = add_command(weights, "info", cmd_weights_info, help="show a checkpoint's model card")
    info.add_argument("file", type=Path, nargs="?", default=None, help="default: the shipped checkpoint")
    mix = add_command(weights, "interpolate", cmd_weights_interpolate,
                      help="blend two checkpoints of one architecture (WiSE-FT)")
    mix.add_argument("start", type=Path)
    mix.add_argument("end", type=Path)
    mix.add_argument("--share", type=float, required=True, help="weight of END, 0 to 1")
    mix.add_argument("--out", type=Path, required=True)
    mix.add_argument("--name", default=None, help="model name in the card")
    mix.add_argument("--version", default=None, help="version in the card")
    mix.add_argument("--description", default=None, help="description in the card")


def cmd_weights_download(args: argparse.Namespace) -> int:
    """Download a known checkpoint, verify its SHA-256 and that it loads, and store it in the cache folder.
    universeg-v1 is the official UniverSeg checkpoint: research use only (OpenRAIL++-M)."""
    from autocontour.config import Settings
    from autocontour.model.weights import KNOWN_WEIGHTS, RESEARCH_ONLY_NOTICE, download

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
    from autocontour.config import Settings
    from autocontour.model.weights import load_model

    _, card = load_model(args.file or Settings().default_weights)
    print(card.model_dump_json(indent=1))
    return 0


def cmd_weights_interpolate(args: argparse.Namespace) -> int:
    """Write (1 - SHARE) x START + SHARE x END, weight by weight: a fine-tuned checkpoint blended with its starting
    point keeps much of both (how the shipped v2 was made, see models/MODEL_CARD.md). Research-only inputs give
    research-only output."""
    from autocontour.errors import OptionError
    from autocontour.model.weights import interpolate, save_checkpoint

    try:
        model, card = interpolate(args.start, args.end, args.share)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    updates = {key: value for key, value in (("name", args.name), ("version", args.version),
                                             ("description", args.description)) if value}
    print(f"{args.out}\nsha256 {save_checkpoint(model, args.out, card.model_copy(update=updates))}")
    return 0
