"""Transfer learning: adapt a trained in-context network to a clinic's own cases.

A clinic contours its own way. Its labelled cases become training tasks (one
per structure and case, built with the same recipes as its support sets), the
network starts from an existing checkpoint, and one case is held out: each
validation segments that case's slices with supports from the other cases,
and training stops when that stops improving. The best checkpoint is kept.
"""

from __future__ import annotations

from pathlib import Path

from autocontour.config import Settings
from autocontour.io import CanonicalCT, read_ct, read_image
from autocontour.support.build import label_names_for, structure_mask
from autocontour.support.recipes import load_recipes
from autocontour.training.data import Volume, prepare_training_data
from autocontour.training.dataset import load_training_data
from autocontour.training.train import TrainConfig, Trainer


def finetune(init: Path, cases: list[tuple[Path, Path]], structures: list[str], out: Path, config: TrainConfig,
             label: int | None = None, holdout_case: int = -1, progress: bool = True) -> dict:
    """Fine-tune `init` on the cases' structures; returns the held-out case's best validation."""
    out = Path(out)
    recipes = load_recipes(Settings().shipped_support_dir / "recipes")
    volumes, case_of = [], []
    for i, (ct_path, labels_path) in enumerate(cases):
        ct = read_ct(ct_path)
        canonical = CanonicalCT(ct)
        labels = read_image(labels_path)
        labels.CopyInformation(ct)
        for name in structures:
            recipe = None if label is not None else recipes.get(name)
            mask, _ = structure_mask(labels, canonical, label, recipe, label_names_for(labels_path))
            volumes.append(Volume(f"case{i}:{name}", "user-supplied", "the clinic's own data", ct,
                                  canonical.to_input_grid(mask.astype("uint8")), {name: 1}))
            case_of.append(i)
    data_path = prepare_training_data(volumes, out / "finetune_data.safetensors")
    held = holdout_case % len(cases)
    trainer = Trainer(load_training_data(data_path), out, config, init=init,
                      query_volumes={v for v, c in enumerate(case_of) if c == held},
                      card={"name": "autocontour-finetuned", "source": f"autocontour finetune from {Path(init).name}",
                            "licence": "the starting checkpoint's licence applies",
                            "details": {"structures": structures, "cases": len(cases), "heldout_case": held}})
    trainer.resume()
    (out / "config.json").write_text(config.model_dump_json(indent=1))
    trainer.run(progress)
    return {"best_heldout_case_dice": trainer.best, "steps": trainer.step}
