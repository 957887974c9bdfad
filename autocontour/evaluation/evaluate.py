"""`autocontour evaluate`: pair predicted and reference masks, measure, report.

Pairing, in order of what is given:

- two folders: by structure name, `<name>.nii.gz` on both sides (the output
  folder of `autocontour segment` works as it is; probability maps are
  skipped);
- a prediction folder and a reference label map: each predicted structure is
  found in the map by name (`labels.json` beside it, or `--ref-labels`) or,
  failing that, built from it with the structure's shipped recipe (so the
  example CT's TotalSegmentator labels yield bladder, anorectum and CTVn);
- two label maps: by label value;
- two single masks: one pair, named by `--structures` or the file name.

A pair must share a grid; when it does not, the prediction is resampled onto
the reference with nearest neighbour and the record says so.

Outputs: metrics.json (the contract: one record per structure with exactly
the metric keys of `metric_keys`, null for undefined values), metrics.csv,
metrics.md, and box/strip plots per metric under plots/.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autocontour.catalogue import BUILTIN
from autocontour.config import Settings
from autocontour.errors import InputImageError, OptionError
from autocontour.evaluation.metrics import DEFAULT_TOLERANCES_MM, compute_metrics, metric_keys
from autocontour.io import CanonicalCT, read_ct, read_image
from autocontour.support.recipes import load_recipes

MASK_SUFFIX = ".nii.gz"
MAX_LABELS = 255  # the most a uint8 label map holds


@dataclass
class Pair:
    structure: str
    pred: sitk.Image
    ref: sitk.Image
    case: str = ""
    notes: list[str] = field(default_factory=list)


def _is_mask_file(path: Path) -> bool:
    return path.name.endswith((".nii.gz", ".nii")) and not path.name.split(".")[0].endswith("_prob")


def _structure_name(path: Path) -> str:
    return path.name.split(".")[0]


def _label_names(path: Path, explicit: Path | None) -> dict[str, int]:
    source = explicit or path.with_name("labels.json")
    if not source.is_file():
        return {}
    return {str(name): int(value) for value, name in json.loads(source.read_text()).items()}


def _binary(image: sitk.Image, value: int | None = None) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    mask = sitk.GetImageFromArray(((array == value) if value is not None else (array > 0)).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _from_label_map(label_map: sitk.Image, names: dict[str, int], structure: str) -> sitk.Image:
    """A structure from a label map: by its name, else by its shipped recipe."""
    if structure in names:
        return _binary(label_map, names[structure])
    recipes = load_recipes(Settings().shipped_support_dir / "recipes")
    if structure not in recipes:
        raise InputImageError(f"the reference label map has no {structure!r} and no recipe builds it")
    canonical = CanonicalCT(label_map, sitk.sitkNearestNeighbor)
    mask = recipes[structure].evaluate(canonical.array.astype(np.int32), names, canonical.spacing_zyx)
    return canonical.to_input_grid(mask.astype(np.uint8))


def pair_inputs(pred: Path, ref: Path, structures: list[str] | None = None, ref_labels: Path | None = None,
                case: str = "") -> list[Pair]:
    """Match predictions to references (see the module docstring)."""
    pred, ref = Path(pred), Path(ref)
    for path, role in ((pred, "prediction"), (ref, "reference")):
        if not path.exists():
            raise InputImageError(f"{role} not found: {path}")
    if pred.is_dir():
        files = {_structure_name(p): p for p in sorted(pred.iterdir()) if _is_mask_file(p)}
        wanted = structures or sorted(files)
        missing = [s for s in wanted if s not in files]
        if missing or not wanted:
            raise InputImageError(f"no prediction mask for {', '.join(missing) or 'any structure'} in {pred}")
        if ref.is_dir():
            pairs = []
            for s in wanted:
                ref_file = ref / f"{s}{MASK_SUFFIX}"
                if not ref_file.is_file():
                    raise InputImageError(f"no reference mask {ref_file.name} in {ref}")
                pairs.append(Pair(s, _binary(read_image(files[s])), _binary(read_image(ref_file)), case))
            return pairs
        label_map = read_image(ref)
        names = _label_names(ref, ref_labels)
        return [Pair(s, _binary(read_image(files[s])), _from_label_map(label_map, names, s), case) for s in wanted]
    if ref.is_dir():
        raise InputImageError("a single prediction file needs a single reference file")
    pred_image, ref_image = read_image(pred), read_image(ref)
    pred_values, ref_values = _label_values(pred_image, "prediction"), _label_values(ref_image, "reference")
    if len(pred_values | ref_values) > 1:  # label maps: pair by value
        label_of = {v: n for n, v in _label_names(ref, ref_labels).items()}
        values = sorted(pred_values | ref_values)
        return [Pair(label_of.get(v, f"label_{v}"), _binary(pred_image, v), _binary(ref_image, v), case)
                for v in values]
    name = structures[0] if structures else _structure_name(pred)
    return [Pair(name, _binary(pred_image), _binary(ref_image), case)]


def _label_values(image: sitk.Image, role: str) -> set:
    """The non-zero values of a mask or label map, refused when they cannot be labels: fractions, or more
    than MAX_LABELS (a CT sent as a mask has thousands, and every label costs two full-size masks)."""
    values = np.unique(sitk.GetArrayViewFromImage(image))
    if not np.array_equal(values, np.round(values)):
        raise InputImageError(f"the {role} holds fractional values: a mask or label map holds whole numbers")
    if len(values) - (0 in values) > MAX_LABELS:
        raise InputImageError(f"the {role} holds {len(values)} distinct values, more than the {MAX_LABELS} labels a "
                              "label map may have: is it a CT instead of a mask?")
    return set(values.tolist()) - {0}


def _on_reference_grid(pair: Pair) -> None:
    p, r = pair.pred, pair.ref
    same = (p.GetSize() == r.GetSize() and np.allclose(p.GetSpacing(), r.GetSpacing(), atol=1e-5)
            and np.allclose(p.GetOrigin(), r.GetOrigin(), atol=1e-3)
            and np.allclose(p.GetDirection(), r.GetDirection(), atol=1e-5))
    if same:
        pair.pred.CopyInformation(r)
        return
    pair.pred = sitk.Resample(p, r, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    pair.notes.append("prediction resampled onto the reference grid (nearest neighbour): grids differed")


def evaluate_pairs(pairs: list[Pair], tolerances_mm=DEFAULT_TOLERANCES_MM,
                   tolerance_by_structure: dict[str, tuple[float, ...]] | None = None) -> list[dict]:
    """One record per pair: structure, case, metrics (exact keys), flags, notes.

    `tolerance_by_structure` adds surface-Dice tolerances for some structures (a CTV is judged
    more leniently than an organ wall); their records gain those `nsd_<t>mm` keys."""
    records = []
    for pair in pairs:
        _on_reference_grid(pair)
        tolerances = list(tolerances_mm)
        tolerances += [t for t in (tolerance_by_structure or {}).get(pair.structure, ()) if t not in tolerances]
        metrics, flags = compute_metrics(sitk.GetArrayFromImage(pair.pred), sitk.GetArrayFromImage(pair.ref),
                                         pair.ref.GetSpacing()[::-1], tolerances)
        records.append({"structure": pair.structure, "case": pair.case, "metrics": metrics, "flags": flags,
                        "notes": pair.notes})
    return records


def parse_tolerances(text: str | None) -> tuple[float, ...]:
    if not text:
        return DEFAULT_TOLERANCES_MM
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise OptionError(f"--tolerance-mm takes numbers like 1,2,3: {text!r}") from exc
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise OptionError(f"tolerances must be positive, finite millimetres: {text!r}")
    return values


def parse_structure_tolerances(items: list[str] | None) -> dict[str, tuple[float, ...]]:
    """`["ctvn=3,5", "bladder=1"]` -> per-structure tolerances; `catalogue` takes each catalogue
    structure's own (`autocontour structures`)."""
    result: dict[str, tuple[float, ...]] = {}
    for item in items or []:
        if item.strip().lower() == "catalogue":
            for name, structure in BUILTIN.items():
                result[name] = tuple(sorted({*result.get(name, ()), structure.nsd_tolerance_mm}))
            continue
        name, sep, values = item.partition("=")
        if not sep or not name.strip():
            raise OptionError(f"--structure-tolerance takes NAME=MM[,MM] or 'catalogue': {item!r}")
        result[name.strip()] = parse_tolerances(values) if values.strip() else ()
        if not result[name.strip()]:
            raise OptionError(f"--structure-tolerance {item!r}: give at least one tolerance in mm")
    return result


def report_tolerances(tolerances_mm, tolerance_by_structure: dict[str, tuple[float, ...]] | None) -> tuple:
    """Every tolerance some record carries, for the columns of the report."""
    extra = sorted({t for ts in (tolerance_by_structure or {}).values() for t in ts} - set(tolerances_mm))
    return (*tolerances_mm, *extra)


def _fmt(value) -> str:
    return "null" if value is None else f"{value:.4g}"


def write_report(records: list[dict], out: Path, tolerances_mm=DEFAULT_TOLERANCES_MM, plots: bool = True,
                 notes: list[str] | None = None) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = metric_keys(tolerances_mm)
    written = {"json": out / "metrics.json", "csv": out / "metrics.csv", "markdown": out / "metrics.md"}
    written["json"].write_text(json.dumps({"tolerances_mm": list(tolerances_mm), "notes": notes or [],
                                           "records": records}, indent=1) + "\n")
    with open(written["csv"], "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["case", "structure", *keys, "flags"])
        for r in records:
            writer.writerow([r["case"], r["structure"], *["" if r["metrics"].get(k) is None else r["metrics"][k]
                                                          for k in keys], "; ".join(r["flags"] + r["notes"])])
    shown = ["dice", "jaccard", "precision", "recall", "rvd", *[k for k in keys if k.startswith("nsd_")],
             "hd95_mm", "hd100_mm", "assd_mm", "volume_ref_ml", "volume_pred_ml"]
    lines = ["| case | structure | " + " | ".join(shown) + " |", "|" + " --- |" * (len(shown) + 2)]
    for r in records:
        lines.append(f"| {r['case'] or '-'} | {r['structure']} | "
                     + " | ".join(_fmt(r["metrics"].get(k)) for k in shown) + " |")
    if any(r["flags"] or r["notes"] for r in records):
        lines += ["", *[f"- {r['structure']}: {m}" for r in records for m in r["flags"] + r["notes"]]]
    written["markdown"].write_text("\n".join(lines) + "\n")
    if plots:
        from autocontour.evaluation.plots import metric_plots

        written["plots"] = metric_plots(records, out / "plots", keys)
    return written


def comparison_preview(ct_path: Path, pairs: list[Pair], out: Path) -> Path:
    """Predicted contours (solid) over reference contours (dashed) on the CT."""
    from autocontour.preview import volume_preview  # matplotlib: only when a preview is drawn

    ct = CanonicalCT(read_ct(ct_path))
    for pair in pairs:
        if pair.ref.GetSize() != ct.input.GetSize():
            raise InputImageError(f"--ct does not share the masks' grid ({pair.structure})")
    predicted = {p.structure: ct.to_canonical(p.pred).astype(bool) for p in pairs}
    reference = {p.structure: ct.to_canonical(p.ref).astype(bool) for p in pairs}
    return volume_preview(ct.array, ct.spacing_zyx, predicted, out, z_mm=ct.slice_positions_mm(),
                          reference=reference, title="prediction (solid) vs reference (dashed)")
