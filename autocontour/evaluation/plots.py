"""Box and strip plots of metrics, one picture per metric, structures side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from autocontour.preview import colour_of  # noqa: E402

LABELS = {"dice": "Dice", "jaccard": "Jaccard", "precision": "precision", "recall": "recall",
          "rvd": "relative volume difference", "hd100_mm": "Hausdorff distance (mm)", "hd95_mm": "HD95 (mm)",
          "asd_ref_to_pred_mm": "ASD reference->prediction (mm)",
          "asd_pred_to_ref_mm": "ASD prediction->reference (mm)",
          "assd_mm": "average symmetric surface distance (mm)", "volume_ref_ml": "reference volume (mL)",
          "volume_pred_ml": "predicted volume (mL)"}


def metric_label(key: str) -> str:
    if key.startswith("nsd_"):
        return f"surface Dice at {key[4:-2]} mm"
    return LABELS.get(key, key)


def metric_plots(records: list[dict], folder: Path, keys: list[str]) -> Path:
    """plots/<metric>.png: a box per structure with every case as a point; nulls counted in the title."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for key in keys:
        # a per-structure tolerance's key exists only for that structure's records
        structures = list(dict.fromkeys(r["structure"] for r in records if key in r["metrics"]))
        values = {s: [r["metrics"][key] for r in records if r["structure"] == s] for s in structures}
        nulls = sum(v is None for vs in values.values() for v in vs)
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(structures), 3.6))
        data = [[v for v in values[s] if v is not None] for s in structures]
        if any(data):
            ax.boxplot([d if d else [np.nan] for d in data], widths=0.5, showfliers=False,
                       medianprops={"color": "black"})
        for i, (s, d) in enumerate(zip(structures, data, strict=True), start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, color=colour_of(s), edgecolor="black", zorder=3, s=28)
        ax.set_xticks(range(1, len(structures) + 1), structures)
        ax.set_ylabel(metric_label(key))
        if key in ("dice", "jaccard", "precision", "recall") or key.startswith("nsd_"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(metric_label(key) + (f" ({nulls} undefined/infinite not shown)" if nulls else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{key}.png", dpi=90)
        plt.close(fig)
    return folder
