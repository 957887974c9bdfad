"""Stage 6: write what a planning system and a reviewer need.

    <structure>.nii.gz        uint8 mask (0/1) on the input CT's exact grid
    <structure>_prob.nii.gz   float32 probability, same grid (optional)
    summary.json              everything needed to judge and trace the result
    preview.png               contours on representative slices, flagged ones framed

Nothing written here names the patient or the input file: file names can
carry identifiers, so the summary identifies the scan by a content hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autocontour.io import write_image

SUMMARY = "summary.json"
PREVIEW = "preview.png"


def mask_file(structure: str) -> str:
    return f"{structure}.nii.gz"


def probability_file(structure: str) -> str:
    return f"{structure}_prob.nii.gz"


def write_masks(out_dir: Path, masks: dict[str, sitk.Image],
                probabilities: dict[str, sitk.Image] | None = None) -> dict[str, Path]:
    """Write masks and optional probability maps; returns the paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, mask in masks.items():
        written[name] = out_dir / mask_file(name)
        write_image(mask, written[name])
    for name, probability in (probabilities or {}).items():
        written[f"{name}_prob"] = out_dir / probability_file(name)
        write_image(probability, written[f"{name}_prob"])
    return written


def write_summary(out_dir: Path, summary: dict) -> Path:
    """Write summary.json (once, when every other output and timing is in it)."""
    path = Path(out_dir) / SUMMARY
    path.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
