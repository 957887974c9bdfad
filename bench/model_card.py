"""Numbers for models/MODEL_CARD.md: a checkpoint vs an untrained network vs a non-learned baseline.

Every number comes through the product's entry point, `Segmenter.segment`, as a
user gets it: localisation, the coarse-to-fine search, level-matched supports,
the threshold and postprocessing (holes, the overlap rules, connected components).

On the example CT, for structures held out of training (never seen) and for
the shipped structures (seen in training), each structure gets a support set of
64 slices built from the same CT; one `segment()` call per method segments all
of them. The CT is a source case of every set, so the engine leaves each query's
own slice and its neighbours out of its support (leave-slice-out,
autocontour/engine/selection.py); the script stops if a structure's summary does not say so.
Support size S = 8, one ensemble member, the device's default precision unless
--precision is given (on a CPU with native bfloat16 the start-up check may
choose it); each method records what ran.

- checkpoint: `--weights`.
- untrained: a checkpoint file of the same architecture with random weights (seed 0).
- atlas_baseline: the same `segment()` with the network replaced by
  `autocontour.evaluation.baseline.AtlasEngine`: each query copies, after affine
  registration, the label of the most similar of the supports the search chose
  for it.

Metrics: 3D Dice and surface Dice at 2 mm on the true spacing, against the
example's labels (for the shipped structures, made by their shipped recipes
like their support sets).

    python bench/model_card.py --weights models/autocontour-universeg-v1.safetensors --threads 1
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

from autocontour.config import Settings  # noqa: E402
from autocontour.evaluation.baseline import AtlasEngine  # noqa: E402
from autocontour.evaluation.metrics import compute_metrics  # noqa: E402
from autocontour.io import CanonicalCT, read_ct  # noqa: E402
from autocontour.model import UniverSeg  # noqa: E402
from autocontour.model.weights import ModelCard, save_checkpoint  # noqa: E402
from autocontour.options import SegmentOptions  # noqa: E402
from autocontour.pipeline import SegmentationResult, Segmenter  # noqa: E402
from autocontour.support.build import build_support_set  # noqa: E402
from autocontour.support.recipes import load_recipes  # noqa: E402

CT = ROOT / "examples" / "pelvis_ct" / "ct.nii.gz"
LABELS = ROOT / "examples" / "pelvis_ct" / "labels.nii.gz"
HELDOUT = ["iliopsoas_left", "iliopsoas_right", "kidney_left", "kidney_right", "femur_left", "femur_right", "spleen"]
SEEN = ["bladder", "anorectum", "ctvn"]
SUPPORT_SET_SIZE = 64
LEFT_OUT = "this CT is a source case of the support set"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--support-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the networks' precision (default: the device's, as `autocontour segment` chooses)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "model_card_results.json")
    parser.add_argument("--methods", default="checkpoint,untrained,atlas_baseline",
                        help="which of checkpoint, untrained, atlas_baseline to run (comma-separated)")
    args = parser.parse_args()
    if args.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = Settings(threads=args.threads)
    structures = HELDOUT + SEEN

    names = {v: int(k) for k, v in json.loads((LABELS.parent / "labels.json").read_text()).items()}
    ct = CanonicalCT(read_ct(CT))
    labels = ct.to_canonical(sitk.ReadImage(str(LABELS)))
    recipes = load_recipes(ROOT / "support_sets" / "recipes")

    with tempfile.TemporaryDirectory() as tmp:
        sets, references = Path(tmp) / "support_sets", {}
        for name in structures:
            recipe = recipes.get(name) if name in SEEN else None
            build_support_set(name, name, [(CT, LABELS)], sets / name, size=SUPPORT_SET_SIZE,
                              label=None if recipe else names[name], recipe=recipe, preview=False)
            references[name] = (recipe.evaluate(labels, names, ct.spacing_zyx) if recipe else labels == names[name])
        untrained = Path(tmp) / "untrained.safetensors"
        torch.manual_seed(0)
        save_checkpoint(UniverSeg(), untrained, ModelCard(name="untrained", version="seed 0", sha256="",
                                                          licence="n/a", source="random init"))

        results = {}
        for method, weights in (("checkpoint", args.weights), ("untrained", untrained), ("atlas_baseline", None)):
            if method not in args.methods.split(","):
                continue
            started = time.perf_counter()
            if weights is None:  # the card of an unused file: the baseline runs no network
                segmenter = Segmenter(settings, weights=untrained, support_dirs=[sets], shipped_support=False,
                                      precision="float32")
                segmenter.model.engine = AtlasEngine()  # type: ignore[assignment]  # duck-types Engine.predict
            else:
                segmenter = Segmenter(settings, weights=weights, support_dirs=[sets], shipped_support=False,
                                      precision=args.precision)
            result = segmenter.segment(CT, None, SegmentOptions(structures=structures, support_size=args.support_size,
                                                                ensemble=1, preview=False))
            check_left_out(result, structures)
            results[method] = {n: score(ct.to_canonical(result.masks[n]).astype(bool), references[n], ct)
                               for n in structures}
            results[method]["seconds"] = round(time.perf_counter() - started, 1)
            results[method]["precision"] = result.summary.model.precision
            if weights is not None:
                results[method]["sha256"] = result.summary.model.sha256

    summary = {"entry_point": "Segmenter.segment", "support_set_size": SUPPORT_SET_SIZE,
               "support_size": args.support_size, "ensemble": 1, "threads": args.threads, "heldout": HELDOUT,
               "seen": SEEN, "results": results}
    for per in results.values():
        for group, members in (("heldout", HELDOUT), ("seen", SEEN)):
            per[f"mean_{group}"] = {k: round(float(np.mean([per[n][k] for n in members])), 4)
                                    for k in ("dice", "nsd_2mm")}
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))


def check_left_out(result: SegmentationResult, structures: list[str]) -> None:
    """The engine must have segmented with leave-slice-out, or the numbers copy the CT's own labels."""
    missing = [n for n in structures
               if not any(w.startswith(LEFT_OUT) for w in result.summary.structures[n].warnings)]
    if missing:
        raise SystemExit(f"leave-slice-out did not apply to {', '.join(missing)}: the numbers would be in-sample")


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
