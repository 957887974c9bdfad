"""Training data: every labelled slice of every training CT, in one tensor file.

Episodic training needs random access to thousands of labelled slices. They
are prepared once, with exactly the preprocessing the pipeline uses
(`app.preprocess`), into one safetensors file that a GPU machine without
SimpleITK can load:

    images   (N, 128, 128) float16   model input in [0, 1]
    labels   (N, 128, 128) uint8     the volume's label map on the same slice
    volume   (N,) int16              which volume the slice comes from
    plane    (N,) int8               0 axial, 1 coronal, 2 sagittal
    position (N,) int16              slice index along the plane's normal
    heldout  (N,) bool               axial slices kept out of training for validation

plus metadata (JSON): per volume its source, licence and label names. Axial
slices come from the model grid of `prepare`; coronal and sagittal slices are
cut from the same canonical volume and resized to 128x128, for task
diversity (the UniverSeg paper trains on all three planes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

from app.io import CanonicalCT, read_ct, read_image
from app.phantom import make_phantom
from app.preprocess import PreprocessSpec, prepare

PLANES = ("axial", "coronal", "sagittal")
HELDOUT_PERIOD, HELDOUT_WIDTH = 12, 2  # axial slices z with z % 12 < 2 are validation-only
OTHER_PLANE_STRIDE = 2  # every 2nd coronal / sagittal slice


@dataclass
class Volume:
    """One labelled CT as training data."""

    name: str
    source: str
    licence: str
    ct: sitk.Image
    labels: sitk.Image
    names: dict[str, int]


def volume_from_files(ct_path: Path, labels_path: Path, names_path: Path | None, name: str, source: str,
                      licence: str) -> Volume:
    names_path = names_path or Path(labels_path).with_name("labels.json")
    values = json.loads(Path(names_path).read_text())
    labels = read_image(labels_path)
    ct = read_ct(ct_path)
    labels.CopyInformation(ct)
    return Volume(name, source, licence, ct, labels, {str(n): int(v) for v, n in values.items()})


def phantom_volumes(count: int, seed: int = 1000) -> list[Volume]:
    """Synthetic pelves on varied grids (spacing, size, orientation), half of them female."""
    rng = np.random.default_rng(seed)
    volumes = []
    for i in range(count):
        spacing = (float(rng.uniform(2.5, 4.5)),) * 2 + (float(rng.choice([2.5, 3.0, 5.0])),)
        size = (int(400 / spacing[0]), int(330 / spacing[1]), int(170 / spacing[2]))
        p = make_phantom(seed + i, size=size, spacing=spacing, orientation=str(rng.choice(["LPS", "RAS"])),
                         female=bool(i % 2))
        volumes.append(Volume(f"phantom{seed + i}", "app.phantom (synthetic)", "synthetic, no restriction",
                              p.ct, p.labels, p.names))
    return volumes


def _resize(stack: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)).unsqueeze(1)
    if mode == "nearest":
        out = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.squeeze(1).numpy()


def volume_slices(volume: Volume, spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """All training slices of one volume, in the three planes."""
    ct = CanonicalCT(volume.ct)
    model_input = prepare(ct, spec)
    label_grid = sitk.Resample(sitk.DICOMOrient(volume.labels, "LPS") if not ct.oblique else volume.labels,
                               model_input.grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    axial_labels = sitk.GetArrayFromImage(label_grid)
    body = model_input.body_slices
    images, labels, plane, position = [model_input.images[body]], [axial_labels[body]], [], []
    z = np.nonzero(body)[0]
    plane += [0] * z.size
    position += z.tolist()
    # coronal (z, x) and sagittal (z, y) cuts of the windowed canonical volume, superior at the top
    hu = ct.array
    canonical_labels = ct.to_canonical(volume.labels)
    windowed = spec.window(hu)
    for axis, plane_id in ((1, 1), (2, 2)):
        picks = np.arange(0, hu.shape[axis], OTHER_PLANE_STRIDE)
        cut_img = np.moveaxis(windowed, axis, 0)[picks][:, ::-1]
        cut_lab = np.moveaxis(canonical_labels, axis, 0)[picks][:, ::-1]
        keep = cut_img.reshape(len(picks), -1).max(axis=1) > 0.05
        images.append(_resize(cut_img[keep], spec.size, "bilinear"))
        labels.append(_resize(cut_lab[keep].astype(np.float32), spec.size, "nearest").astype(np.uint8))
        plane += [plane_id] * int(keep.sum())
        position += picks[keep].tolist()
    plane_arr = np.array(plane, dtype=np.int8)
    position_arr = np.array(position, dtype=np.int16)
    heldout = (plane_arr == 0) & (position_arr % HELDOUT_PERIOD < HELDOUT_WIDTH)
    return {"images": np.concatenate(images).astype(np.float16), "labels": np.concatenate(labels).astype(np.uint8),
            "plane": plane_arr, "position": position_arr, "heldout": heldout}


def prepare_training_data(volumes: list[Volume], out: Path, spec: PreprocessSpec | None = None) -> Path:
    """Write every volume's slices and metadata into one safetensors file."""
    spec = spec or PreprocessSpec()
    parts = [volume_slices(v, spec) for v in volumes]
    tensors = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    tensors["volume"] = np.concatenate([np.full(len(p["plane"]), i, dtype=np.int16) for i, p in enumerate(parts)])
    metadata = {
        "preprocessing": spec.model_dump_json(),
        "volumes": json.dumps([{"name": v.name, "source": v.source, "licence": v.licence, "names": v.names}
                               for v in volumes]),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out), metadata=metadata)
    return out
