"""Numbers for models/MODEL_CARD.md: a checkpoint vs an untrained network vs a non-learned baseline.

On the example CT, for structures held out of training (never seen) and for the
shipped structures (seen in training), each structure gets a support set of 64
slices built from the same CT; every query slice is segmented with its own
slice and neighbours left out of the support (leave-slice-out), using the
product's inference path (coarse-to-fine search, level-matched supports) at the
CPU defaults. The baseline labels every body slice. Metrics: 3D Dice and
surface Dice at 2 mm on the true spacing.

    python bench/model_card.py --weights models/autocontour-universeg-v1.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine import Engine, InferenceOptions, predict_structures  # noqa: E402
from app.engine.plan import _allowed  # noqa: E402
from app.evaluation.baseline import atlas_predict  # noqa: E402
from app.evaluation.metrics import compute_metrics  # noqa: E402
from app.io import CanonicalCT, fingerprint, read_ct  # noqa: E402
from app.model import UniverSeg  # noqa: E402
from app.model.weights import ModelCard, load_model, save_checkpoint  # noqa: E402
from app.preprocess import PreprocessSpec, grid_to_canonical, prepare  # noqa: E402
from app.support.build import build_support_set  # noqa: E402
from app.support.localize import bone_profile  # noqa: E402
from app.support.recipes import load_recipes  # noqa: E402

CT = ROOT / "examples" / "pelvis_ct" / "ct.nii.gz"
LABELS = ROOT / "examples" / "pelvis_ct" / "labels.nii.gz"
HELDOUT = ["iliopsoas_left", "iliopsoas_right", "kidney_left", "kidney_right", "femur_left", "femur_right", "spleen"]
SEEN = ["bladder", "anorectum", "ctvn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--support-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "model_card_results.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    names = {v: int(k) for k, v in json.loads((LABELS.parent / "labels.json").read_text()).items()}
    ct = CanonicalCT(read_ct(CT))
    labels = ct.to_canonical(sitk.ReadImage(str(LABELS)))
    recipes = load_recipes(ROOT / "support_sets" / "recipes")
    spec = PreprocessSpec()
    model_input = prepare(ct, spec)
    scan = fingerprint(ct.image)
    profile = bone_profile(ct.array, ct.spacing_zyx, ct.slice_positions_mm())

    with tempfile.TemporaryDirectory() as tmp:
        supports, references = {}, {}
        for name in HELDOUT + SEEN:
            recipe = recipes.get(name) if name in SEEN else None
            label = None if recipe else names[name]
            supports[name] = build_support_set(name, name, [(CT, LABELS)], Path(tmp) / name, size=64,
                                               label=label, recipe=recipe, preview=False)
            references[name] = (recipe.evaluate(labels, names, ct.spacing_zyx) if recipe else labels == names[name])
        untrained = Path(tmp) / "untrained.safetensors"
        torch.manual_seed(0)
        save_checkpoint(UniverSeg(), untrained, ModelCard(name="untrained", version="seed 0", sha256="",
                                                          licence="n/a", source="random init"))
        results = {}
        for method, weights in (("checkpoint", args.weights), ("untrained", untrained)):
            started = time.perf_counter()
            model, card = load_model(weights)
            engine = Engine(model, "cpu")
            inputs = {n: model_input for n in supports}
            predictions = predict_structures(engine, inputs, supports,
                                             InferenceOptions(support_size=args.support_size), scan, profile=profile)
            results[method] = {n: score(grid_to_canonical(p.probability, model_input, ct) >= 0.5, references[n], ct)
                               for n, p in predictions.items()}
            results[method]["seconds"] = round(time.perf_counter() - started, 1)
            if method == "checkpoint":
                results[method]["sha256"] = card.sha256
        started = time.perf_counter()
        body = np.nonzero(model_input.body_slices)[0]
        results["atlas_baseline"] = {}
        for name, support in supports.items():
            own = {c.case for c in support.manifest.source_cases}
            fractions = np.zeros(model_input.images.shape, dtype=np.float32)
            fractions[body] = atlas_predict(model_input.images[body], support,
                                            [_allowed(support, z, own) for z in body])
            results["atlas_baseline"][name] = score(grid_to_canonical(fractions, model_input, ct) >= 0.5,
                                                    references[name], ct)
        results["atlas_baseline"]["seconds"] = round(time.perf_counter() - started, 1)

    summary = {"support_set_size": 64, "support_size": args.support_size, "ensemble": 1, "heldout": HELDOUT,
               "seen": SEEN, "results": results}
    for _method, per in results.items():
        for group, members in (("heldout", HELDOUT), ("seen", SEEN)):
            per[f"mean_{group}"] = {k: round(float(np.mean([per[n][k] for n in members])), 4)
                                    for k in ("dice", "nsd_2mm")}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))


def score(pred: np.ndarray, ref: np.ndarray, ct: CanonicalCT) -> dict:
    metrics, _ = compute_metrics(pred, ref, ct.spacing_zyx, tolerances_mm=(2.0,))
    return {"dice": round(metrics["dice"], 4), "nsd_2mm": round(metrics["nsd_2mm"], 4)}


def table(summary: dict) -> str:
    methods = list(summary["results"])
    lines = ["| structure | " + " | ".join(f"{m} Dice | {m} NSD@2mm" for m in methods) + " |",
             "|---" * (1 + 2 * len(methods)) + "|"]
    for name in summary["heldout"] + summary["seen"] + ["mean_heldout", "mean_seen"]:
        cells = []
        for m in methods:
            r = summary["results"][m][name]
            cells += [f"{r['dice']:.3f}", f"{r['nsd_2mm']:.3f}"]
        tag = " (held out)" if name in summary["heldout"] else " (seen)" if name in summary["seen"] else ""
        lines.append(f"| {name}{tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
