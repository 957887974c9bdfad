"""Training data: every labelled slice of every training CT, in one tensor file.

Episodic training needs random access to thousands of labelled slices. They
are prepared once, with exactly the preprocessing the pipeline uses
(`autocontour.preprocess`), into one safetensors file that a GPU machine without
SimpleITK can load:

    images   (N, 128, 128) float16   model input in [0, 1]
    labels   (N, 128, 128) uint8     the volume's label map on the same slice
    hu_bits  (N, 128, 128) uint8     the HU tasks (`autocontour.training.hu_tasks`), one bit each
    volume   (N,) int16              which volume the slice comes from
    plane    (N,) int8               0 axial, 1 coronal, 2 sagittal, 3 axial structure-centred crop
    position (N,) int16              slice index along the plane's normal
    crop_of  (N,) uint8              a crop's centre structure (its label value; 0 for whole views)
    heldout  (N,) bool               axial slices kept out of training for validation

plus metadata (JSON): per volume its source, licence, label names, patient,
role (train; validation: a held-out virtual patient; validation_split: a real patient of a validation split)
and, for a virtual patient, its draw. Axial slices
come from the model grid of `prepare`; coronal and sagittal slices are cut
from the same canonical volume and resized to 128x128, for task diversity
(the UniverSeg paper trains on all three planes); crops come from
`prepare_crop`, centred on a labelled structure at the side a support set
would store for it (`autocontour.support.build.crop_for`), as the engine's fine pass
sees them.

Virtual patients (`Draw`, `autocontour.training.randomise`) are drawn while the
data is prepared, in worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.numpy import save_file

from autocontour.errors import InputImageError
from autocontour.io import CanonicalCT, read_ct, read_image
from autocontour.phantom import make_phantom
from autocontour.preprocess import ModelInput, PreprocessSpec, mask_centre_mm, prepare, prepare_crop
from autocontour.support.build import CROP_MAX_FRACTION, crop_margin_mm, in_plane_extent_mm
from autocontour.training.dataset import CROP_PLANE
from autocontour.training.hu_tasks import TASKS, hu_task_bits
from autocontour.training.randomise import DomainRandomisation, random_patient

PLANES = ("axial", "coronal", "sagittal")
HELDOUT_PERIOD, HELDOUT_WIDTH = 12, 2  # axial slices z with z % 12 < 2 are validation-only
OTHER_PLANE_STRIDE = 2  # every 2nd coronal / sagittal slice
MIN_LENGTH_FOR_OTHER_PLANES = 0.4  # of the width: a few-slice scan cut coronally would be a squashed strip
CROP_SLICES = 24  # at most this many crop slices per structure and volume (spread over its extent)
CROP_POOL = 3  # crops come from a per-patient pool of this many times `crops` structures
CROP_JITTER = 0.08  # the crop's centre is off by this fraction of its side (the engine's centre is a guess)


@dataclass
class Volume:
    """One CT as training data: labelled, or unlabelled (HU tasks only)."""

    name: str
    source: str
    licence: str
    ct: sitk.Image
    labels: sitk.Image | None
    names: dict[str, int]
    patient: str = ""  # who was scanned: a virtual patient keeps its source's (defaults to the name)
    role: str = "train"  # never trained on: "validation" (held-out virtual patients), "validation_split" (real)
    hu_tasks: tuple[str, ...] = TASKS  # which HU tasks this scan may give
    hu_bits: sitk.Image | None = None  # precomputed HU tasks (a virtual patient's, from its clean intensities)
    crops: int = 0  # structure-centred crops for up to this many labelled structures
    parameters: dict = field(default_factory=dict)  # a virtual patient's draw


@dataclass
class Draw:
    """A virtual patient of a labelled CT on disk, drawn (in a worker) when the data is prepared."""

    ct_path: Path
    labels_path: Path | None  # None: an unlabelled CT (HU tasks only)
    patient: str
    seed: int
    role: str = "train"
    hu_tasks: tuple[str, ...] = TASKS
    crops: int = 0
    licence: str = "see the source's licence"

    def volume(self, randomisation: DomainRandomisation | None = None) -> Volume:
        source = read_case(self.ct_path, self.labels_path, self.patient, str(self.ct_path), self.licence)
        labels = source.labels
        if labels is None:  # unlabelled: an empty label map travels with the anatomy
            labels = sitk.Image(source.ct.GetSize(), sitk.sitkUInt8)
            labels.CopyInformation(source.ct)
        drawn = random_patient(source.ct, labels, source.names, self.seed, randomisation, self.hu_tasks)
        return Volume(f"{self.patient}~{self.seed}", f"{self.ct_path} (virtual patient, seed {self.seed})",
                      self.licence, sitk.Cast(drawn.ct, sitk.sitkFloat32),  # as read_ct gives it
                      drawn.labels if source.labels is not None else None, source.names,
                      patient=self.patient, role=self.role,
                      hu_tasks=self.hu_tasks, hu_bits=drawn.hu_bits, crops=self.crops, parameters=drawn.parameters)


@dataclass
class FolderPatient:
    """A real patient stored as a folder: `ct.nii.gz` and one `<structure>.nii.gz` mask (0/1, the CT's grid) per
    contour, as planning systems export them and OpenKBP publishes them; read (in a worker) when the data is
    prepared, so a recipe of many patients does not hold them all in memory."""

    folder: Path
    patient: str
    structures: tuple[str, ...]
    licence: str
    role: str = "train"
    hu_tasks: tuple[str, ...] = TASKS
    crops: int = 0

    def volume(self) -> Volume:
        ct = read_ct(self.folder / "ct.nii.gz")
        names, label_map = merged_masks(self.folder, self.structures, ct)
        return Volume(self.patient, str(self.folder), self.licence, ct, label_map, names, patient=self.patient,
                      role=self.role, hu_tasks=self.hu_tasks, crops=self.crops)


def merged_masks(folder: Path, structures: Sequence[str], ct: sitk.Image) -> tuple[dict[str, int], sitk.Image]:
    """One label map from a folder's per-structure masks: structure i of `structures` is value i + 1 (the same
    value in every patient), a voxel in two masks keeps the structure listed first (one label map holds one
    structure per voxel), and a structure without a file, or with an empty mask, is not in the names."""
    merged = np.zeros(sitk.GetArrayViewFromImage(ct).shape, dtype=np.uint8)
    names = {}
    for value, name in enumerate(structures, start=1):
        path = folder / f"{name}.nii.gz"
        if not path.is_file():
            continue
        mask = sitk.GetArrayFromImage(read_image(path)) > 0
        if mask.shape != merged.shape:
            raise InputImageError(f"the mask {name}.nii.gz of a patient folder is not on its CT's grid")
        merged[mask & (merged == 0)] = value
        if (merged == value).any():
            names[name] = value
    label_map = sitk.GetImageFromArray(merged)
    label_map.CopyInformation(ct)
    return names, label_map


def read_any_ct(path: Path) -> sitk.Image:
    """A CT from a NIfTI file or a DICOM series folder, through the product's reader and its checks."""
    from autocontour.config import Settings
    from autocontour.dicom.reading import read_input

    return read_input(Path(path), Settings())[0]


def read_case(ct_path: Path, labels_path: Path | None, patient: str, source: str, licence: str) -> Volume:
    """A real CT of a recipe as a volume named after its patient: labelled, or (no `labels_path`) not."""
    if labels_path is not None:
        return volume_from_files(ct_path, labels_path, None, patient, source, licence)
    return Volume(patient, source, licence, read_any_ct(ct_path), None, {})


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
        volumes.append(Volume(f"phantom{seed + i}", "autocontour.phantom (synthetic)", "synthetic, no restriction",
                              p.ct, p.labels, p.names))
    return volumes


def _resize(stack: np.ndarray, size: int, mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)).unsqueeze(1)
    if mode == "nearest":
        out = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.squeeze(1).numpy()


def _on_grid(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8))


def _crop_slices(volume: Volume, ct: CanonicalCT, spec: PreprocessSpec, labels: sitk.Image, bits: sitk.Image,
                 canonical_labels: np.ndarray, model_input: ModelInput) -> list[dict]:
    """Structure-centred crops of up to `volume.crops` labelled structures. They are drawn from a pool three
    times that size fixed per patient, so a structure's crops recur in several of its virtual patients and
    crop tasks can be cross-patient too."""
    pool = np.random.default_rng(zlib.crc32((volume.patient or volume.name).encode())).permutation(
        sorted(set(volume.names.values())))[:CROP_POOL * volume.crops]
    present = [int(v) for v in pool if (canonical_labels == v).sum() >= 200]
    rng = np.random.default_rng(zlib.crc32(volume.name.encode()))
    chosen: list[int] = [int(v) for v in rng.permutation(present)[:volume.crops]] if present else []
    sx, sy = ct.image.GetSpacing()[:2]
    view_side = model_input.pixel_mm * spec.size
    parts = []
    for value in chosen:
        mask = canonical_labels == value
        extent = in_plane_extent_mm(mask, (sx, sy))
        side = (extent + 2 * crop_margin_mm(extent)) * rng.uniform(0.85, 1.15)  # sets differ in their source cases
        if side >= CROP_MAX_FRACTION * view_side:
            continue
        centre = np.array(mask_centre_mm(mask, ct.image)) + rng.normal(0, CROP_JITTER * side, 2)
        view = prepare_crop(ct, spec, (float(centre[0]), float(centre[1])), float(side), model_input.body_slices)
        rows = np.nonzero(mask.any(axis=(1, 2)))[0]
        rows = np.arange(max(0, rows.min() - 2), min(mask.shape[0], rows.max() + 3))
        rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), CROP_SLICES)).round().astype(int)]
        parts.append({"images": view.images[rows], "labels": _on_grid(labels, view.grid)[rows],
                      "hu_bits": _on_grid(bits, view.grid)[rows], "plane": np.full(len(rows), CROP_PLANE),
                      "position": rows, "crop_of": np.full(len(rows), int(value))})
    return parts


def volume_slices(volume: Volume, spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """All training slices of one volume: the three planes and, if asked for, structure-centred crops."""
    ct = CanonicalCT(volume.ct)
    model_input = prepare(ct, spec)
    hu = ct.array
    labels_image = volume.labels if volume.labels is not None else ct.canonical_like(np.zeros(hu.shape, np.uint8))
    labels = sitk.DICOMOrient(labels_image, "LPS") if not ct.oblique else labels_image
    canonical_labels = ct.to_canonical(labels_image)
    canonical_bits = (ct.to_canonical(volume.hu_bits) if volume.hu_bits is not None
                      else hu_task_bits(hu, ct.spacing_zyx, volume.hu_tasks))
    bits = ct.canonical_like(canonical_bits.astype(np.uint8))
    body = model_input.body_slices
    z = np.nonzero(body)[0]
    parts = [{"images": model_input.images[body], "labels": _on_grid(labels, model_input.grid)[body],
              "hu_bits": _on_grid(bits, model_input.grid)[body], "plane": np.zeros(z.size), "position": z}]
    # coronal (z, x) and sagittal (z, y) cuts of the windowed canonical volume, superior at the top
    windowed = spec.window(hu)
    length_mm, width_mm = hu.shape[0] * ct.spacing_zyx[0], hu.shape[2] * ct.spacing_zyx[2]
    other_planes = ((1, 1), (2, 2)) if length_mm >= MIN_LENGTH_FOR_OTHER_PLANES * width_mm else ()
    for axis, plane_id in other_planes:
        picks = np.arange(0, hu.shape[axis], OTHER_PLANE_STRIDE)
        cut_img = np.moveaxis(windowed, axis, 0)[picks][:, ::-1]
        keep = cut_img.reshape(len(picks), -1).max(axis=1) > 0.05

        def cut(array, picks=picks, keep=keep, axis=axis):
            stack = np.moveaxis(array, axis, 0)[picks][:, ::-1][keep].astype(np.float32)
            return _resize(stack, spec.size, "nearest").astype(np.uint8)

        parts.append({"images": _resize(cut_img[keep], spec.size, "bilinear"), "labels": cut(canonical_labels),
                      "hu_bits": cut(canonical_bits), "plane": np.full(int(keep.sum()), plane_id),
                      "position": picks[keep]})
    if volume.crops and volume.labels is not None:
        parts += _crop_slices(volume, ct, spec, labels, bits, canonical_labels, model_input)
    out: dict[str, np.ndarray] = {"images": np.concatenate([p["images"] for p in parts]).astype(np.float16),
           "labels": np.concatenate([p["labels"] for p in parts]).astype(np.uint8),
           "hu_bits": np.concatenate([p["hu_bits"] for p in parts]).astype(np.uint8),
           "plane": np.concatenate([p["plane"] for p in parts]).astype(np.int8),
           "position": np.concatenate([p["position"] for p in parts]).astype(np.int16),
           "crop_of": np.concatenate([p.get("crop_of", np.zeros(len(p["plane"]))) for p in parts]).astype(np.uint8)}
    out["heldout"] = (out["plane"] == 0) & (out["position"] % HELDOUT_PERIOD < HELDOUT_WIDTH)
    return out


def _describe(volume: Volume) -> dict:
    return {"name": volume.name, "source": volume.source, "licence": volume.licence, "names": volume.names,
            "patient": volume.patient or volume.name, "role": volume.role, "hu_tasks": list(volume.hu_tasks),
            "parameters": volume.parameters}


def _prepared(item: Volume | Draw | FolderPatient, spec: PreprocessSpec) -> tuple[dict, dict[str, np.ndarray]]:
    volume = item if isinstance(item, Volume) else item.volume()
    return _describe(volume), volume_slices(volume, spec)


def prepare_training_data(volumes: Sequence[Volume | Draw | FolderPatient], out: Path,
                          spec: PreprocessSpec | None = None, workers: int = 1) -> Path:
    """Write every volume's slices and metadata into one safetensors file (`workers` processes)."""
    spec = spec or PreprocessSpec()
    if workers > 1:  # spawned, not forked: a fork of a process whose torch threads have started can crash
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            prepared = list(pool.map(_prepared, volumes, [spec] * len(volumes)))
    else:
        prepared = [_prepared(v, spec) for v in volumes]
    parts = [p for _, p in prepared]
    tensors = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    tensors["volume"] = np.concatenate([np.full(len(p["plane"]), i, dtype=np.int16) for i, p in enumerate(parts)])
    metadata = {
        "preprocessing": spec.model_dump_json(),
        "volumes": json.dumps([description for description, _ in prepared]),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out), metadata=metadata)
    return out


class CaseSource(BaseModel):
    """One real CT in a training-data recipe: labelled (`labels`) or not, and the virtual patients drawn from it."""

    ct: Path
    labels: Path | None = None
    patient: str
    licence: str
    draws: int = Field(0, ge=0, description="virtual patients for training (seeds 1-7999)")
    validation_draws: int = Field(0, ge=0, description="held-out virtual patients for validation (seeds 8000-8999)")
    hu_tasks: list[str] = list(TASKS)
    crops: int = Field(8, ge=0, description="structures given structure-centred crops, per volume")


HEAD_AND_NECK_ORGANS = ["brainstem", "spinal_cord", "parotid_left", "parotid_right", "esophagus", "larynx", "mandible"]


def natural_order(folder: Path) -> list[Path]:
    """The patient folders in a folder, pt_2 before pt_10."""
    def key(path: Path) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    return sorted((p for p in folder.iterdir() if p.is_dir()), key=key)


class PatientFolders(BaseModel):
    """Real patients of one split, each a folder with `ct.nii.gz` and one `<structure>.nii.gz` per contour
    (`FolderPatient`), so that a recipe can say "the first N train patients" without listing them.

    A train split's patients give cross-patient episodes; a validation split's are never trained on and are
    validated among themselves (query and supports from different patients of the split). The targets (PTVs)
    overlap the organs and each other, which one label map cannot hold, so the default is the organs."""

    folder: Path
    licence: str
    split: Literal["train", "validation"] = "train"
    count: int | None = Field(None, ge=1, description="this many patients (default: all)")
    seed: int | None = Field(None, description="None: the first `count` in natural order; else a seeded choice")
    structures: list[str] = Field(default_factory=lambda: list(HEAD_AND_NECK_ORGANS), min_length=1)
    hu_tasks: list[str] = list(TASKS)
    crops: int = Field(4, ge=0, description="structures given structure-centred crops, per patient")

    def patients(self, root: Path) -> list[FolderPatient]:
        folders = [p for p in natural_order(root / self.folder) if (p / "ct.nii.gz").is_file()]
        count = min(self.count or len(folders), len(folders))
        if self.seed is None:
            chosen = folders[:count]
        else:
            picks = np.sort(np.random.default_rng(self.seed).choice(len(folders), count, replace=False))
            chosen = [folders[i] for i in picks]
        role = "train" if self.split == "train" else "validation_split"
        split = f"{self.folder.parent.name}/{self.folder.name}"  # e.g. openkbp_hn/train: a name, not a path
        return [FolderPatient(p, f"{split}/{p.name}", tuple(self.structures), self.licence, role,
                              tuple(self.hu_tasks), self.crops) for p in chosen]


class TrainingDataRecipe(BaseModel):
    """What `autocontour train --recipe` prepares: real cases, their virtual patients and phantoms.

    Paths are relative to the recipe file's folder's parent (the repository, for `models/*.json`)."""

    cases: list[CaseSource] = []
    patient_folders: list[PatientFolders] = []
    phantoms: int = Field(0, ge=0)
    phantom_crops: int = Field(4, ge=0)

    def missing(self, root: Path) -> str | None:
        """The first CT or patients' folder the recipe names that is not there, or None."""
        paths = [root / c.ct for c in self.cases] + [root / f.folder for f in self.patient_folders]
        return next((str(p) for p in paths if not p.exists()), None)

    def items(self, root: Path) -> list[Volume | Draw | FolderPatient]:
        items: list[Volume | Draw | FolderPatient] = []
        for number, case in enumerate(self.cases):
            ct_path, labels_path = root / case.ct, root / case.labels if case.labels else None
            real = read_case(ct_path, labels_path, case.patient, str(case.ct), case.licence)
            real.patient, real.hu_tasks, real.crops = case.patient, tuple(case.hu_tasks), case.crops
            items.append(real)
            tasks = tuple(case.hu_tasks)
            items += [Draw(ct_path, labels_path, case.patient, 1 + 1000 * number + i, "train", tasks, case.crops,
                           case.licence) for i in range(case.draws)]
            items += [Draw(ct_path, labels_path, case.patient, 8000 + 100 * number + i, "validation", tasks,
                           case.crops, case.licence) for i in range(case.validation_draws)]
        for folders in self.patient_folders:
            items += folders.patients(root)
        for volume in phantom_volumes(self.phantoms):
            volume.crops = self.phantom_crops
            items.append(volume)
        return items


def load_recipe(path: Path) -> tuple[TrainingDataRecipe, Path]:
    """A recipe and the folder its paths are relative to."""
    path = Path(path)
    return TrainingDataRecipe.model_validate_json(path.read_text()), path.resolve().parent.parent
