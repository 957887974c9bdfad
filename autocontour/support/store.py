"""Support sets as data: labelled 128x128 slices of one structure, plus a manifest.

A support set is what gives autocontour a clinic's contouring style, so it
must be as traceable as the weights: each one is a folder

    manifest.json       the structure it segments (its definition: name,
                        display name, colour, RT ROI type, TG-263 name,
                        laterality, ...), source cases, slices and their axial
                        levels, preprocessing recipe, creation date, hash
    slices.safetensors  images (N, H, W) float16 in [0, 1], labels (N, H, W) uint8;
                        format 2 adds crop_images, crop_labels: the same slices in
                        the structure-centred crop (manifest `crop`)
    preview.png         the picked slices with their contours
    atlas/<case>/       (format 2) a small copy of each source case, CT and mask
                        at about 4 mm (autocontour.support.registration.AtlasCase), for the
                        registration prior; its size is in the manifest

and is addressed by a content hash over the tensors and the whole manifest
(all but its build date). Results name the `id` (`<name>-<hash12>`), so a
contour can always be traced to the exact examples that shaped it. Loading
verifies the hash, and refuses a path in the manifest that leaves the set's
folder (`..`, an absolute path, a symbolic link out): a set is one folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from autocontour.catalogue import StructureDefinition, default_definition
from autocontour.errors import SupportSetError
from autocontour.preprocess import PreprocessSpec
from autocontour.support.registration import ATLAS_CT_FILE, ATLAS_MASK_FILE, AtlasCase

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no atlas copies; such sets run without a registration prior
MANIFEST = "manifest.json"
TENSORS = "slices.safetensors"
PREVIEW = "preview.png"


class SupportSlice(BaseModel):
    """One labelled example and where it came from."""

    case: str  # source case id (never a patient identifier)
    slice_index: int  # canonical axial index in the source case (0 = most inferior)
    z_mm: float
    level: float  # position within the structure's axial extent: 0 inferior end, 1 superior end
    foreground_pixels: int
    flipped: bool = False  # left-right mirrored copy (augmentation)


class AtlasCopy(BaseModel):
    """Where a source case's small copy lies in the set's folder, its size and its hash."""

    folder: str  # relative to the support set's folder
    bytes: int
    sha256: str  # over the CT file then the mask file
    spacing_mm: float

    @field_validator("folder")
    @classmethod
    def _inside_the_set(cls, folder: str) -> str:
        """A relative path that stays in the set's folder (links are checked on load, where the folder is known)."""
        if PurePosixPath(folder).is_absolute() or PureWindowsPath(folder).is_absolute() or ".." in Path(folder).parts:
            raise ValueError(f"atlas folder {folder!r} leaves the support set's folder")
        return folder


class SupportCrop(BaseModel):
    """The fine pass's field of view (format 2): a square of `side_mm` centred on the structure.

    The side comes from the source cases' extents of the structure plus a margin, so every example
    and every query show the structure at one scale.
    """

    side_mm: float = Field(gt=0)
    margin_mm: float = Field(ge=0)


class CaseProvenance(BaseModel):
    """Where a source case came from and who stood behind its contours, so a set can be audited.

    It never holds a patient identifier or an input file name (file names often carry the patient's name
    or record number): the CT is known by its fingerprint, the mask file by its SHA-256.
    """

    kind: Literal["file", "pacs", "result"]  # --case files, a PACS study, a reviewed and corrected result
    added: str  # when the case joined the set (ISO 8601, UTC)
    mask_sha256: str  # the mask file (NIfTI or RTSTRUCT) exactly as given
    study_uid: str | None = None  # kind "pacs": the Study Instance UID it was taken from
    rtstruct_uid: str | None = None  # an RTSTRUCT mask: its SOP Instance UID
    approval: str | None = None  # an RTSTRUCT's ApprovalStatus (APPROVED, UNAPPROVED, ...); None: not stated
    approved_by: str | None = None  # the RTSTRUCT's ReviewerName, when approved
    approved_on: str | None = None  # its ReviewDate and ReviewTime (YYYYMMDD[HHMMSS]); a result: ISO 8601 UTC
    allowed_unapproved: bool = False  # taken although not approved, because --allow-unapproved said so
    # kind "result" added by the server: the job whose approved version it is. Left out of the manifest when
    # None, so the sets built before the field existed keep their content hashes (their ids).
    job_id: str | None = Field(None, exclude_if=lambda v: v is None)


class SourceCase(BaseModel):
    case: str
    fingerprint: str  # SHA-256 of the canonical CT's voxels and geometry (autocontour.io.fingerprint)
    num_slices: int
    spacing_mm: list[float]
    extent_slices: list[int]  # first and last slice showing the structure
    label: str  # how the mask was made: "label 104", "binary mask", or "recipe ctvn"
    extent_mm: list[float] | None = None  # z (patient superior, mm) of the first and last slice showing it
    bone_profile: dict | None = None  # autocontour.support.localise.Profile: where along z the skeleton is
    atlas: AtlasCopy | None = None  # format 2: the small copy for the registration prior
    crop_centre_mm: list[float] | None = None  # format 2: (x, y) centre of the structure, where its crops are
    provenance: CaseProvenance | None = None  # None in sets built before provenance was recorded


class SupportManifest(BaseModel):
    format_version: int = FORMAT_VERSION
    name: str
    structure: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    definition: StructureDefinition | None = None  # None in sets built before the open catalogue: built-in
    symmetric: bool = False  # the builder may fill the set with left-right mirrored copies
    version: str = "1"
    description: str = ""
    created: str
    updated: str | None = None  # when cases were last added (`support add`); None: never
    source: str = ""  # where the labelled cases come from, and their licence
    preprocessing: PreprocessSpec
    recipe: dict | None = None
    crop: SupportCrop | None = None  # format 2: structure-centred crops for the fine pass
    source_cases: list[SourceCase]
    slices: list[SupportSlice]
    content_hash: str = ""
    warnings: list[str] = Field(default_factory=list)


class SupportSet:
    """Loaded support set: manifest plus arrays."""

    def __init__(self, manifest: SupportManifest, images: np.ndarray, labels: np.ndarray, path: Path | None = None,
                 crop_images: np.ndarray | None = None, crop_labels: np.ndarray | None = None):
        if images.shape != labels.shape or images.ndim != 3:
            raise SupportSetError(f"images {images.shape} and labels {labels.shape} must both be (N, H, W)")
        crops = [a.shape for a in (crop_images, crop_labels) if a is not None]
        if (manifest.crop is not None) != (len(crops) == 2) or any(shape != images.shape for shape in crops):
            raise SupportSetError("a set with crops needs crop images and labels of its slices' shape, and only then")
        if len(manifest.slices) != images.shape[0]:
            raise SupportSetError(f"manifest lists {len(manifest.slices)} slices, tensors hold {images.shape[0]}")
        size = manifest.preprocessing.size
        if images.shape[1:] != (size, size):
            raise SupportSetError(f"slices are {images.shape[1:]}, preprocessing says {size}x{size}")
        self.manifest = manifest
        self.images = images.astype(np.float32)
        self.labels = (labels > 0).astype(np.float32)
        self.crop_images = None if crop_images is None else crop_images.astype(np.float32)
        self.crop_labels = None if crop_labels is None else (crop_labels > 0).astype(np.float32)
        self.path = path
        self._atlas: dict[str, AtlasCase] | None = None

    @property
    def structure(self) -> str:
        return self.manifest.structure

    @property
    def definition(self) -> StructureDefinition:
        """The structure as this set declares it (or the built-in definition of its name)."""
        return self.manifest.definition or default_definition(self.structure)

    @property
    def content_hash(self) -> str:
        return self.manifest.content_hash

    @property
    def id(self) -> str:
        return f"{self.manifest.name}-{self.content_hash[:12]}"

    def atlas_cases(self) -> dict[str, AtlasCase]:
        """Source case id -> its small CT and mask (format 2 sets); loaded once, on first use."""
        if self._atlas is None:
            self._atlas = {}
            for c in self.manifest.source_cases:
                if c.atlas is not None and self.path is not None:
                    self._atlas[c.case] = AtlasCase.load(self.path / c.atlas.folder)
        return self._atlas

    @property
    def levels(self) -> np.ndarray:
        return np.array([s.level for s in self.manifest.slices], dtype=np.float32)

    def __len__(self) -> int:
        return self.images.shape[0]

    def describe(self) -> dict:
        """What a result or the API says about this set."""
        m = self.manifest
        return {
            "id": self.id,
            "name": m.name,
            "structure": m.structure,
            "version": m.version,
            "content_hash": m.content_hash,
            "size": len(self),
            "positive_slices": int(sum(s.foreground_pixels > 0 for s in m.slices)),
            "source_cases": len(m.source_cases),
            "format_version": m.format_version,
            "atlas_bytes": sum(c.atlas.bytes for c in m.source_cases if c.atlas) or None,
            "symmetric": m.symmetric,
            "source": m.source,
            "created": m.created,
            "recipe": m.recipe,
        }


# The hash covers the whole manifest but these: the hash itself, and the build date (so that a rebuild from the
# same cases with the same code keeps its id). Every other field can change what a set draws or what it claims.
# Only the hash itself and build times are left out: a set rebuilt from the same cases with the same code keeps
# its id (support_sets/rebuild.sh), and no time changes what a set draws.
UNHASHED_FIELDS: dict[str, Any] = {"content_hash": True, "created": True, "updated": True,
                   "source_cases": {"__all__": {"provenance": {"added"}}}}


def content_hash(manifest: SupportManifest, images: np.ndarray, labels: np.ndarray,
                 crops: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """SHA-256 over the manifest (all but UNHASHED_FIELDS) and the tensors.

    Every field is covered, not a chosen few: an uncovered field (a source case's fingerprint, the slices'
    extents, `symmetric`, the name) could be edited under the same id and change what the set draws, and a
    field added later is covered without anyone having to remember it.
    """
    digest = hashlib.sha256()
    identity = manifest.model_dump(mode="json", exclude=UNHASHED_FIELDS)
    digest.update(json.dumps(identity, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images, dtype=np.float16).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    for array, dtype in zip(crops or (), (np.float16, np.uint8), strict=False):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    return digest.hexdigest()


def atlas_sha256(folder: Path) -> str | None:
    """SHA-256 over an atlas copy's CT and mask files; None if either is missing."""
    digest = hashlib.sha256()
    for name in (ATLAS_CT_FILE, ATLAS_MASK_FILE):
        path = Path(folder) / name
        if not path.is_file():
            return None
        digest.update(path.read_bytes())
    return digest.hexdigest()


def save_atlas_copy(atlas: AtlasCase, set_folder: Path, case: str) -> AtlasCopy:
    """Write a source case's small copy into the set's folder (before the manifest that names it)."""
    relative = f"atlas/{case}"
    size = atlas.save(Path(set_folder) / relative)
    return AtlasCopy(folder=relative, bytes=size, sha256=atlas_sha256(Path(set_folder) / relative) or "",
                     spacing_mm=round(float(atlas.ct.GetSpacing()[0]), 3))


def save_support_set(manifest: SupportManifest, images: np.ndarray, labels: np.ndarray, folder: Path,
                     crops: tuple[np.ndarray, np.ndarray] | None = None) -> SupportSet:
    """Write a support set folder (with its crops' images and labels, if any); the manifest gets its hash."""
    tensors: dict[str, np.ndarray] = {"images": np.ascontiguousarray(images, dtype=np.float16),
               "labels": np.ascontiguousarray(labels > 0, dtype=np.uint8)}
    if crops is not None:
        tensors |= {"crop_images": np.ascontiguousarray(crops[0], dtype=np.float16),
                    "crop_labels": np.ascontiguousarray(crops[1] > 0, dtype=np.uint8)}
    stored_crops = (tensors["crop_images"], tensors["crop_labels"]) if crops is not None else None
    manifest = manifest.model_copy(update={"content_hash": content_hash(manifest, tensors["images"],
                                                                        tensors["labels"], stored_crops)})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TENSORS).write_bytes(save(tensors))  # as the umask allows (safetensors' save_file makes it 0600)
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=1) + "\n")
    return SupportSet(manifest, tensors["images"], tensors["labels"], folder, *(stored_crops or (None, None)))


def load_support_set(folder: Path) -> SupportSet:
    folder = Path(folder)
    try:
        manifest = SupportManifest.model_validate_json((folder / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise SupportSetError(f"{folder}: no {MANIFEST}") from exc
    except ValidationError as exc:
        raise SupportSetError(f"{folder / MANIFEST} is not a valid support-set manifest: "
                              f"{exc.errors()[0]['msg']}") from exc
    if manifest.format_version not in READABLE_VERSIONS:
        raise SupportSetError(f"{folder}: format version {manifest.format_version}; this version of autocontour "
                              f"reads {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        tensors = load_file(str(folder / TENSORS))
        images, labels = tensors["images"], tensors["labels"]
        crops = (tensors["crop_images"], tensors["crop_labels"]) if manifest.crop is not None else None
    except (FileNotFoundError, SafetensorError, KeyError, OSError) as exc:
        raise SupportSetError(f"{folder}: cannot read {TENSORS}: {exc}") from exc
    actual = content_hash(manifest, images, labels, crops)
    if actual != manifest.content_hash:
        raise SupportSetError(f"{folder}: content hash mismatch (manifest {manifest.content_hash[:12]}, "
                              f"data {actual[:12]}): the set was modified after it was built")
    for case in manifest.source_cases:
        if case.atlas is None:
            continue
        atlas = _inside(folder, case.atlas.folder)
        for name in (ATLAS_CT_FILE, ATLAS_MASK_FILE):
            _inside(folder, atlas / name)
        if atlas_sha256(atlas) != case.atlas.sha256:
            raise SupportSetError(f"{folder}: the atlas copy of {case.case} was modified or is missing")
    return SupportSet(manifest, images, labels, folder, *(crops or (None, None)))


def _inside(folder: Path, relative: str | Path) -> Path:
    """`folder / relative` with links resolved, refused unless it stays in the set's folder: a set is one folder,
    and its manifest must not make autocontour read files anywhere else the process can read."""
    root = folder.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise SupportSetError(f"{folder}: {relative} leads outside the support set's folder")
    return path


def discover(folders: list[Path]) -> dict[str, SupportSet]:
    """Support sets by structure. Later folders override earlier ones for the same structure.

    A folder may be a support set itself or hold support sets one level down.
    """
    found: dict[str, SupportSet] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise SupportSetError(f"support-set folder not found: {folder}")
        candidates = [folder] if (folder / MANIFEST).is_file() else sorted(
            p for p in folder.iterdir() if (p / MANIFEST).is_file())
        for candidate in candidates:
            support = load_support_set(candidate)
            found[support.structure] = support
    return found
