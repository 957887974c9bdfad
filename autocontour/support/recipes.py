"""Structure recipes: target volumes composed from other labels, as clinicians compose them.

A CTV is rarely a single organ: CTVn is the pelvic vessels plus a margin,
minus bone, muscle, bowel and bladder; CTVp is cervix, tumour, uterus and
upper vagina together. A recipe writes that composition down as JSON so a
support set can be built from any label map that has the ingredients:

    {"label": "urinary_bladder"}                      one label, by name or value
    {"union": [e, ...]}  {"intersection": [e, ...]}
    {"subtract": [e, e_1, ...]}                       e minus every e_i
    {"expand": e, "mm": 7}  {"shrink": e, "mm": 2}    isotropic margin in mm, on the true spacing
    {"axial_limit": e, "reference": r,                keep slices of e between fractions of r's
     "from_fraction": 0, "to_fraction": 0.5}          axial extent (0 = inferior end, 1 = superior end);
                                                      a fraction left out leaves that side open
    {"track_from_inferior": e}                        follow a tube upwards: from the largest piece on
                                                      the lowest slice, keep on each next slice only the
                                                      pieces touching what was kept below (the rectum,
                                                      not the sigmoid loops that dip beside it)

A string stands for {"label": string}. A recipe's "optional_labels" may be
missing from a label map (they count as empty, and the build says so);
any other missing label is an error, since a silently empty ingredient would
change the structure. Masks are canonical (z, y, x) arrays, z running
inferior -> superior (see autocontour.io).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage

from autocontour.errors import SupportSetError

OPERATORS = ("label", "union", "intersection", "subtract", "expand", "shrink", "axial_limit", "track_from_inferior")


class Recipe:
    """A named, validated structure recipe."""

    def __init__(self, structure: str, expression, description: str = "", optional_labels: list[str] | None = None):
        self.structure = structure
        self.expression = expression
        self.description = description
        self.optional_labels = list(optional_labels or [])
        self.labels_used()  # validates the expression

    @classmethod
    def from_file(cls, path: Path) -> Recipe:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SupportSetError(f"cannot read recipe {path}: {exc}") from exc
        return cls.from_dict(data, f"recipe {path}")

    @classmethod
    def from_dict(cls, data: object, origin: str = "the recipe") -> Recipe:
        """A recipe from its JSON form (a recipe file, or the copy a support set's manifest keeps)."""
        if not isinstance(data, dict) or "structure" not in data or "expression" not in data:
            raise SupportSetError(f"{origin} needs 'structure' and 'expression'")
        return cls(data["structure"], data["expression"], data.get("description", ""), data.get("optional_labels"))

    def to_dict(self) -> dict:
        return {"structure": self.structure, "description": self.description, "expression": self.expression,
                "optional_labels": self.optional_labels}

    def labels_used(self) -> list[str | int]:
        found: list[str | int] = []
        _walk(self.expression, found)
        return found

    def evaluate(self, label_map: np.ndarray, names: Mapping[str, int], spacing_zyx: tuple[float, float, float],
                 missing: list[str] | None = None) -> np.ndarray:
        """The recipe's mask on a canonical label map; `names` maps label name -> value.

        Optional labels absent from `names` are appended to `missing`.
        """
        absent = [n for n in self.optional_labels if n not in names]
        if missing is not None:
            missing += absent
        context = _Context(label_map, names, np.asarray(spacing_zyx, dtype=float), set(absent))
        return _evaluate(self.expression, context)


def _walk(expr, found: list) -> None:
    """Append every label the expression names, in order; raises SupportSetError where it is malformed."""
    if isinstance(expr, (str, int)):
        found.append(expr)
        return
    if not isinstance(expr, dict) or len([k for k in expr if k in OPERATORS]) != 1:
        raise SupportSetError(f"recipe expression must be a label or an object with one of {OPERATORS}: {expr!r}")
    op = next(k for k in expr if k in OPERATORS)
    arg = expr[op]
    if op == "label":
        if not isinstance(arg, (str, int)):
            raise SupportSetError(f"'label' takes a name or a value, got {arg!r}")
        found.append(arg)
        return
    for operand in _operands(op, arg, expr):
        _walk(operand, found)


def _operands(op: str, arg, expr: dict) -> list:
    """The sub-expressions of a compound operator, once its own arguments are checked."""
    if op in ("union", "intersection", "subtract"):
        if not isinstance(arg, list) or not arg:
            raise SupportSetError(f"'{op}' takes a non-empty list, got {arg!r}")
        return arg
    if op in ("expand", "shrink"):
        if not isinstance(expr.get("mm"), (int, float)) or expr["mm"] < 0:
            raise SupportSetError(f"'{op}' needs a non-negative 'mm', got {expr.get('mm')!r}")
    elif op == "axial_limit":
        if "reference" not in expr:
            raise SupportSetError("'axial_limit' needs a 'reference' expression")
        lo, hi = expr.get("from_fraction", -np.inf), expr.get("to_fraction", np.inf)
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi):
            raise SupportSetError(f"'axial_limit' needs from_fraction <= to_fraction, got {lo!r}, {hi!r}")
        return [arg, expr["reference"]]
    return [arg]  # track_from_inferior, expand, shrink


class _Context:
    def __init__(self, label_map: np.ndarray, names: Mapping[str, int], spacing: np.ndarray, absent: set[str]):
        self.label_map, self.names, self.spacing, self.absent = label_map, names, spacing, absent


def _evaluate(expr, ctx: _Context) -> np.ndarray:
    if isinstance(expr, (str, int)):
        expr = {"label": expr}
    op = next(k for k in expr if k in OPERATORS)
    arg = expr[op]
    if op == "label":
        if isinstance(arg, int):
            return ctx.label_map == arg
        if arg in ctx.names:
            return ctx.label_map == ctx.names[arg]
        if arg in ctx.absent:
            return np.zeros(ctx.label_map.shape, dtype=bool)
        raise SupportSetError(f"label {arg!r} is not in the label map's names")
    if op in ("union", "intersection", "subtract"):
        masks = [_evaluate(e, ctx) for e in arg]
        if op == "union":
            return np.logical_or.reduce(masks)
        if op == "intersection":
            return np.logical_and.reduce(masks)
        return masks[0] & ~np.logical_or.reduce(masks[1:]) if len(masks) > 1 else masks[0]
    if op in ("expand", "shrink"):
        return margin(_evaluate(arg, ctx), float(expr["mm"]) * (1 if op == "expand" else -1), ctx.spacing)
    if op == "track_from_inferior":
        return track_from_inferior(_evaluate(arg, ctx))
    # axial_limit
    mask = _evaluate(arg, ctx)
    zs = np.nonzero(_evaluate(expr["reference"], ctx).any(axis=(1, 2)))[0]
    if zs.size == 0:
        return np.zeros_like(mask)
    lo, hi = zs.min(), zs.max()
    z_from = lo + expr["from_fraction"] * (hi - lo) if "from_fraction" in expr else -np.inf
    z_to = lo + expr["to_fraction"] * (hi - lo) if "to_fraction" in expr else np.inf
    z = np.arange(mask.shape[0])[:, None, None]
    return mask & (z >= z_from) & (z <= z_to)


def margin(mask: np.ndarray, mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Grow (mm > 0) or shrink (mm < 0) a mask by a Euclidean margin on the true spacing."""
    if mm == 0 or not mask.any():
        return mask.copy()
    if mm < 0:
        return ~margin(~mask, -mm, spacing_zyx)
    pad = np.ceil(mm / spacing_zyx).astype(int) + 1
    idx = np.nonzero(mask)
    lo = np.maximum(np.array([i.min() for i in idx]) - pad, 0)
    hi = np.minimum(np.array([i.max() for i in idx]) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    distance = ndimage.distance_transform_edt(~mask[box], sampling=spacing_zyx)
    out = np.zeros_like(mask)
    out[box] = distance <= mm
    return out


def track_from_inferior(mask: np.ndarray) -> np.ndarray:
    """Keep the tube that starts at the lowest slice, slice by slice upwards."""
    out = np.zeros_like(mask)
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return out
    labels, n = ndimage.label(mask[zs[0]])
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    out[zs[0]] = labels == 1 + int(np.argmax(sizes))
    for z in range(zs[0] + 1, mask.shape[0]):
        below = ndimage.binary_dilation(out[z - 1], iterations=1)
        labels, _ = ndimage.label(mask[z])
        touching = np.unique(labels[below & (labels > 0)])
        if touching.size == 0:
            break
        out[z] = np.isin(labels, touching)
    return out


def load_recipes(folder: Path) -> dict[str, Recipe]:
    recipes = {}
    for path in sorted(Path(folder).glob("*.json")):
        recipe = Recipe.from_file(path)
        recipes[recipe.structure] = recipe
    return recipes
