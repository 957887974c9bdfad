"""`autocontour train` and `finetune`: episodic in-context training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autocontour.cli.parsing import add_command


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
    from autocontour.training.train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, support_size=args.support_size,
                       learning_rate=args.lr, low_res_steps=args.low_res_steps,
                       heldout_structures=[s for s in args.heldout.split(",") if s],
                       validate_every=args.validate_every, checkpoint_every=args.checkpoint_every,
                       patience=args.patience, max_seconds=args.max_seconds, seed=args.seed, device=args.device,
                       negative_share=args.negative_share, negative_reach=args.negative_reach or None)


def add_train_command(commands: argparse._SubParsersAction) -> None:
    train = add_command(commands, "train", cmd_train, help="train the in-context network (episodic)")
    train.add_argument("--case", nargs=2, metavar=("CT", "LABELS"), type=Path, action="append", default=[],
                       help="a CT and its label map (labels.json beside it names the values); repeatable")
    train.add_argument("--phantoms", type=int, default=12, help="synthetic phantom volumes to add (default 12)")
    train.add_argument("--recipe", type=Path, default=None,
                       help="a training-data recipe (JSON, autocontour/training/data.py: TrainingDataRecipe) "
                            "instead of --case/--phantoms: real cases, their virtual patients, HU tasks, crops")
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


def cmd_train(args: argparse.Namespace) -> int:
    """Episodic in-context training (see autocontour/training): cross-patient episodes on the labels and HU tasks
    of the given CTs, their virtual patients (--recipe) and synthetic phantoms. With --from, the starting weights
    are validated first (step 0). Resumes from OUT/checkpoint.pt."""
    from autocontour.errors import OptionError
    from autocontour.training.train import train

    data = args.data
    if data is None:
        from collections.abc import Sequence

        from autocontour.training.data import (  # needs SimpleITK
            Draw,
            FolderPatient,
            Volume,
            load_recipe,
            phantom_volumes,
            prepare_training_data,
            volume_from_files,
        )

        volumes: Sequence[Volume | Draw | FolderPatient]
        if args.recipe is not None:
            recipe, root = load_recipe(args.recipe)
            if (missing := recipe.missing(root)) is not None:
                raise OptionError(f"the recipe's {missing} is not there")
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
    finetune = add_command(commands, "finetune", cmd_finetune, help="adapt a checkpoint to a clinic's labelled cases")
    finetune.add_argument("--from", dest="init", type=Path, required=True, help="starting checkpoint")
    finetune.add_argument("--case", nargs=2, metavar=("CT", "LABELS"), type=Path, action="append", required=True,
                          help="a CT and its label map or mask; at least two cases")
    finetune.add_argument("--structures", required=True,
                          help="structures to learn, each made by its shipped recipe (or --label for one structure)")
    finetune.add_argument("--label", type=int, default=None, help="label value of the single structure in the masks")
    finetune.add_argument("--holdout-case", type=int, default=-1, help="index of the case kept for early stopping "
                                                                         "(default: the last)")
    _training_options(finetune, steps=1000, patience=5)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Transfer learning: start from a compatible checkpoint (the project's, the official one or your own) and
    fine-tune on your cases' structures, with early stopping on a held-out case."""
    from autocontour.catalogue import parse_structures
    from autocontour.errors import OptionError
    from autocontour.training.finetune import finetune

    if len(args.case) < 2:
        raise OptionError("fine-tuning needs at least two cases: one is held out for early stopping")
    names = parse_structures(args.structures)
    scores = finetune(args.init, [tuple(c) for c in args.case], names, args.out, _train_config(args),
                      label=args.label, holdout_case=args.holdout_case, progress=not args.quiet)
    print(json.dumps(scores, indent=1))
    print(f"weights: {args.out / 'best.safetensors'} (use with --weights)")
    return 0
