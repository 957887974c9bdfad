"""Pictures for review: contours drawn on CT, the way a clinician looks at them.

Every picture follows the same conventions, so that nobody has to learn two:
axial slices in radiological view (patient's right on the image's left,
anterior at the top), coronal and sagittal views with superior at the top and
true millimetre aspect, a soft-tissue window, one fixed colour per structure
(the catalogue's) with a legend, slice positions in mm, flagged slices framed
in red, and the draft notice on the picture itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from autocontour.catalogue import StructureDefinition, default_definition  # noqa: E402

DRAFT_NOTICE = "DRAFT - automatic contours for clinical review, not for treatment without approval"
SOFT_TISSUE = (40.0, 400.0)  # level, width in HU
FLAG_COLOUR = "#ff3030"


def _definition(name: str, definitions: Mapping[str, StructureDefinition] | None) -> StructureDefinition | None:
    if definitions and name in definitions:
        return definitions[name]
    try:
        return default_definition(name)
    except ValueError:  # not a structure name (an evaluation label such as "label 3")
        return None


def colour_of(name: str, definitions: Mapping[str, StructureDefinition] | None = None) -> tuple[float, float, float]:
    """The structure's declared colour (built-in, or a stable palette colour for other names)."""
    definition = _definition(name, definitions)
    if definition is not None:
        r, g, b = definition.colour
        return r / 255, g / 255, b / 255
    palette = plt.get_cmap("tab10")
    return palette(zlib.crc32(name.encode()) % 10)[:3]  # the same colour in every run (hash() is salted)


def window(hu: np.ndarray, level: float = SOFT_TISSUE[0], width: float = SOFT_TISSUE[1]) -> np.ndarray:
    return np.clip((hu - (level - width / 2)) / width, 0, 1)


def representative_slices(masks: Mapping[str, np.ndarray], num_slices: int, count: int,
                          flagged: Sequence[int] = ()) -> list[int]:
    """Axial slices spread over the structures' joint extent, flagged ones included first."""
    occupied = np.zeros(num_slices, dtype=bool)
    for mask in masks.values():
        occupied |= mask.reshape(mask.shape[0], -1).any(axis=1)
    zs = np.nonzero(occupied)[0]
    if zs.size == 0:
        return list(np.linspace(0, num_slices - 1, min(count, num_slices)).round().astype(int))
    picked = [z for z in dict.fromkeys(flagged) if occupied[z]][: count // 3]
    for z in np.linspace(zs.min(), zs.max(), count).round().astype(int):
        if len(picked) >= count:
            break
        if z not in picked:
            picked.append(int(z))
    return sorted(picked)


def _draw_contours(ax, masks: Mapping[str, np.ndarray], take, dashed: bool = False,
                   definitions: Mapping[str, StructureDefinition] | None = None) -> None:
    for name, mask in masks.items():
        plane = take(mask)
        if plane.any():
            ax.contour(plane.astype(float), levels=[0.5], colors=[colour_of(name, definitions)],
                       linewidths=1.0 if dashed else 1.2, linestyles="dashed" if dashed else "solid")


def _legend(fig, names: Sequence[str], extra: Sequence[Patch] = (),
            definitions: Mapping[str, StructureDefinition] | None = None) -> None:
    def label(name: str) -> str:
        definition = _definition(name, definitions)
        return definition.display_name if definition else name

    handles = [Patch(facecolor=colour_of(n, definitions), label=label(n)) for n in names]
    fig.legend(handles=handles + list(extra), loc="lower center", ncol=min(6, len(handles) + len(extra)),
               frameon=False, fontsize=9, labelcolor="white")


def volume_preview(ct_hu: np.ndarray, spacing_zyx: Sequence[float], masks: Mapping[str, np.ndarray], path: Path,
                   z_mm: Sequence[float] | np.ndarray | None = None, flagged: Mapping[str, Sequence[int]] | None = None,
                   title: str = "", count: int = 8, reference: Mapping[str, np.ndarray] | None = None,
                   definitions: Mapping[str, StructureDefinition] | None = None) -> Path:
    """A PNG with `count` axial slices plus one coronal and one sagittal view.

    Arrays are canonical (z, y, x): z inferior -> superior, y anterior -> posterior,
    x patient right -> left. `reference` masks, when given, are drawn dashed
    in the same colours (for comparisons).
    """
    flagged = flagged or {}
    flagged_any = sorted({z for zs in flagged.values() for z in zs})
    shown_masks = dict(masks) | {f"{k} (reference)": v for k, v in (reference or {}).items()}
    slices = representative_slices(shown_masks, ct_hu.shape[0], count, flagged_any)
    columns = 4
    rows = int(np.ceil(len(slices) / columns)) + 1
    fig = plt.figure(figsize=(3.2 * columns, 3.3 * rows + 0.6), facecolor="black")
    dz, dy, dx = spacing_zyx
    shown = window(ct_hu)
    for k, z in enumerate(slices):
        label = f"z = {z_mm[z]:.1f} mm" if z_mm is not None else f"slice {z}"
        _axial_panel(fig.add_subplot(rows, columns, k + 1), shown[z], z, dy / dx, label, z in flagged_any, masks,
                     reference or {}, definitions)
    _coronal_and_sagittal(fig, rows, shown, (dz, dy, dx), masks, shown_masks, reference or {}, definitions)
    flag_patch = ([Patch(facecolor="none", edgecolor=FLAG_COLOUR, linewidth=2, label="slice to review")]
                  if flagged_any else [])
    _legend(fig, list(masks), flag_patch, definitions)
    fig.suptitle((title + "\n" if title else "") + DRAFT_NOTICE, color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path


def _axial_panel(ax, image: np.ndarray, z: int, aspect: float, label: str, is_flagged: bool,
                 masks: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 definitions: Mapping[str, StructureDefinition] | None) -> None:
    """One axial slice with its contours, its position, a red frame if it is to review, and its sides."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
    _draw_contours(ax, masks, lambda m: m[z], definitions=definitions)
    _draw_contours(ax, reference, lambda m: m[z], dashed=True, definitions=definitions)
    ax.set_title(label + ("  REVIEW" if is_flagged else ""), color=FLAG_COLOUR if is_flagged else "white",
                 fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(is_flagged)
        spine.set_color(FLAG_COLOUR)
        spine.set_linewidth(2.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(2, image.shape[0] - 3, "R", color="white", fontsize=8)
    ax.text(image.shape[1] - 8, image.shape[0] - 3, "L", color="white", fontsize=8)


def _coronal_and_sagittal(fig, rows: int, shown: np.ndarray, spacing_zyx: Sequence[float],
                          masks: Mapping[str, np.ndarray], shown_masks: Mapping[str, np.ndarray],
                          reference: Mapping[str, np.ndarray],
                          definitions: Mapping[str, StructureDefinition] | None) -> None:
    """The bottom row: a coronal and a sagittal cut through the centre of everything drawn."""
    dz, dy, dx = spacing_zyx
    occupied = [np.argwhere(m) for m in shown_masks.values() if m.any()]
    centre = np.concatenate(occupied).mean(axis=0).round().astype(int) if occupied else np.array(shown.shape) // 2
    views = [("coronal", lambda m: m[:, centre[1], :], dz / dx, ("R", "L")),
             ("sagittal", lambda m: m[:, :, centre[2]], dz / dy, ("A", "P"))]
    for k, (name, take, aspect, (left, right)) in enumerate(views):
        ax = fig.add_subplot(rows, 2, 2 * rows - 1 + k)
        plane = take(shown)
        ax.imshow(plane, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect, interpolation="bilinear")
        _draw_contours(ax, masks, take, definitions=definitions)
        _draw_contours(ax, reference, take, dashed=True, definitions=definitions)
        ax.set_title(name, color="white", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        height, width = plane.shape
        for x, y, letter in ((2, height / 2, left), (width - 8, height / 2, right), (width / 2, height - 6, "S"),
                             (width / 2, 2, "I")):
            ax.text(x, y, letter, color="white", fontsize=8)


def support_set_preview(support, path: Path, columns: int = 8) -> Path:
    """Every slice of a support set with its label contour and relative level."""
    n = len(support)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows + 0.5), facecolor="black",
                             squeeze=False)
    colour = colour_of(support.structure, {support.structure: support.definition})
    for ax, k in zip(axes.flat, range(rows * columns), strict=True):
        ax.axis("off")
        if k >= n:
            continue
        meta = support.manifest.slices[k]
        ax.imshow(support.images[k], cmap="gray", vmin=0, vmax=1)
        if support.labels[k].any():
            ax.contour(support.labels[k], levels=[0.5], colors=[colour], linewidths=0.8)
        ax.set_title(f"{meta.case}:{meta.slice_index}{' m' if meta.flipped else ''} L{meta.level:.2f}",
                     color="white", fontsize=6)
    fig.suptitle(f"support set {support.id} ({support.structure}, {n} slices; L = level in the structure's extent, "
                 "m = mirrored)", color="white", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)
    return Path(path)
