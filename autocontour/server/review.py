"""Slices and contours for the review page, rendered from a finished job's files.

The page draws on a plain canvas: the server sends each CT slice as a PNG in
the requested window and each structure's contour on it as polylines, in the
same canonical views as every other picture (axial in radiological view,
coronal and sagittal with superior at the top). Toggling a structure costs no
request; changing the window fetches a new PNG.

The page's editor paints on the canonical axial view and sends what was drawn
as a NIfTI mask on the job's input grid, so `info()` also gives that grid (the
NIfTI header fields of the job's CT) and the integer map from a canonical voxel
to an input voxel (axis-aligned inputs only: a permutation with flips).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import cast

import contourpy
import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from autocontour.export import SUMMARY
from autocontour.io import CanonicalCT
from autocontour.pipeline.outputs import REVIEW_CT
from autocontour.pipeline.summary import Summary
from autocontour.preview import window

PLANES = ("axial", "coronal", "sagittal")
# What lies at each edge of a view as `ReviewVolume._cut` makes it from the canonical (LPS) volume: the page
# labels the edges with these, so a reader never has to guess the orientation.
EDGES = {
    "axial": {"top": "A", "bottom": "P", "left": "R", "right": "L"},
    "coronal": {"top": "S", "bottom": "I", "left": "R", "right": "L"},
    "sagittal": {"top": "S", "bottom": "I", "left": "A", "right": "P"},
}


class ReviewVolume:
    def __init__(self, result_dir: Path):
        self.summary = Summary.model_validate_json((result_dir / SUMMARY).read_text())
        ct = CanonicalCT(sitk.ReadImage(str(result_dir / REVIEW_CT)))
        self.hu = sitk.GetArrayFromImage(ct.image)
        self.spacing_zyx = ct.spacing_zyx
        self.grid = input_grid(result_dir / REVIEW_CT, ct)
        self.z_mm = ct.slice_positions_mm()
        self.masks = {name: ct.to_canonical(sitk.ReadImage(str(result_dir / s.mask_file))).astype(bool)
                      for name, s in self.summary.structures.items()}

    def count(self, plane: str) -> int:
        return self.hu.shape[PLANES.index(plane)]

    def _cut(self, volume: np.ndarray, plane: str, index: int) -> np.ndarray:
        if plane == "axial":
            return volume[index]
        if plane == "coronal":
            return volume[:, index, :][::-1]
        return volume[:, :, index][::-1]

    def aspect(self, plane: str) -> float:
        dz, dy, dx = self.spacing_zyx
        return {"axial": dy / dx, "coronal": dz / dx, "sagittal": dz / dy}[plane]

    def info(self) -> dict:
        structures = {}
        for name, s in self.summary.structures.items():
            structures[name] = {
                "display_name": s.display_name, "colour": list(s.definition.colour),
                "confidence": s.confidence, "estimated_surface_dice": s.estimated_surface_dice,
                "volume_ml": s.volume_ml, "status": s.status,
                "flagged_slices": [f.model_dump() for f in s.flagged_slices], "slice_range": s.slice_range,
            }
        return {"disclaimer": self.summary.disclaimer, "notices": self.summary.notices,
                "planes": {p: {"count": self.count(p), "aspect": self.aspect(p), "edges": EDGES[p]} for p in PLANES},
                "z_mm": [round(float(z), 2) for z in self.z_mm], "structures": structures,
                "warnings": self.summary.warnings, "grid": self.grid}

    def png(self, plane: str, index: int, level: float, width: float) -> bytes:
        hu = self._cut(self.hu, plane, index).astype(np.float32)
        pixels = (window(hu, level, width) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=1)
        return buffer.getvalue()

    def contours(self, plane: str, index: int) -> dict[str, list[list[list[float]]]]:
        result: dict[str, list] = {}
        for name, mask in self.masks.items():
            cut = self._cut(mask, plane, index)
            if not cut.any():
                continue
            padded = np.pad(cut.astype(np.float32), 1)  # closes contours that touch the border
            # the default line type: a list of (n, 2) arrays
            lines = cast(list[np.ndarray], contourpy.contour_generator(z=padded).lines(0.5))
            result[name] = [np.round(line - 1, 2).tolist() for line in lines if len(line) > 2]
        return result


def input_grid(path: Path, ct: CanonicalCT) -> dict | None:
    """The input grid as the editor writes a NIfTI on it, with `to_input`: input index = matrix @ canonical
    (x, y, z) + offset. None where painting on axial slices cannot be one input k slice each (an oblique
    input, or one whose third axis is not axial): the page then offers no editing."""
    if ct.oblique:
        return None
    corner = np.array(ct.image.TransformIndexToPhysicalPoint((0, 0, 0)))
    offset = np.array(ct.input.TransformPhysicalPointToContinuousIndex(corner.tolist()))
    matrix = np.zeros((3, 3))
    for axis in range(3):
        step = np.array(ct.image.TransformIndexToPhysicalPoint(tuple(int(a == axis) for a in range(3))))
        matrix[:, axis] = np.array(ct.input.TransformPhysicalPointToContinuousIndex(step.tolist())) - offset
    matrix, offset = np.rint(matrix).astype(int), np.rint(offset).astype(int)
    if abs(matrix[2, 2]) != 1:
        return None
    header = cast(nib.Nifti1Header, nib.load(path).header)
    fields = ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
              "qoffset_z", "xyzt_units", "dim", "pixdim", "srow_x", "srow_y", "srow_z")
    nifti = {f: np.asarray(header[f], dtype=float).tolist() for f in fields}
    return {"to_input": {"matrix": matrix.tolist(), "offset": offset.tolist()}, "nifti": nifti}


class ReviewCache:
    """A few recently viewed volumes in memory (a reviewer scrolls through one job at a time).

    A volume is read again once its summary.json changed: an edit or an approval rewrites it, and the
    contours then show the structure's new version."""

    def __init__(self, size: int = 3):
        self.size = size
        self._items: OrderedDict[str, tuple[int, ReviewVolume]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str, result_dir: Path) -> ReviewVolume:
        stamp = (result_dir / SUMMARY).stat().st_mtime_ns
        with self._lock:
            if job_id in self._items and self._items[job_id][0] == stamp:
                self._items.move_to_end(job_id)
                return self._items[job_id][1]
        volume = ReviewVolume(result_dir)
        with self._lock:
            self._items[job_id] = (stamp, volume)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return volume
