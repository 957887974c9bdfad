"""Stage 2: turn canonical CT slices into what the network sees.

UniverSeg works on 128x128 images in [0, 1]. A planning CT slice is 512x512
over a field of view of about 500 mm, mostly air and couch; squeezing that
into 128 pixels would leave a bladder a dozen pixels wide. So each volume is
cropped to a square around the patient's body (one box for the whole volume,
so that scale does not jump between slices), low-pass filtered, resampled to
128x128 and windowed to soft tissue.

The crop and resampling are a SimpleITK grid (`ModelInput.grid`): a real
physical geometry, so probabilities map back to the CT by resampling and
nothing is lost in index bookkeeping. The recipe (`PreprocessSpec`) is stored
with every support set, and queries are prepared with the support set's own
recipe, so support and query always match.

The fine pass can look closer (`crop_grid`): a square of fixed physical side
centred on the structure, the side stored with the support set so that its
examples and the query show the structure at the same scale, at several
times the whole-body view's resolution. A crop that reaches past the scan's
edge is padded with air, never shifted, so its centre stays on the structure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict

from autocontour.errors import InputImageError
from autocontour.io import CanonicalCT

AIR_HU = -1024.0


class PreprocessSpec(BaseModel):
    """How a CT becomes model input. Part of a support set's identity."""

    model_config = ConfigDict(frozen=True)

    window_level_hu: float = 40.0
    window_width_hu: float = 400.0
    size: int = 128
    body_threshold_hu: float = -400.0
    margin_mm: float = 10.0
    antialias: bool = True
    version: int = 1

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def window(self, hu: np.ndarray) -> np.ndarray:
        low = self.window_level_hu - self.window_width_hu / 2
        return np.clip((hu - low) / self.window_width_hu, 0.0, 1.0).astype(np.float32)


@dataclass
class ModelInput:
    """A CT volume as the network sees it: a stack of canonical axial slices."""

    images: np.ndarray  # (Z, size, size) float32 in [0, 1]
    grid: sitk.Image  # geometry of the stack: size x size x Z, LPS
    body_slices: np.ndarray  # (Z,) bool: slices that show some of the body
    spec: PreprocessSpec

    @property
    def pixel_mm(self) -> float:
        return float(self.grid.GetSpacing()[0])

    @property
    def num_slices(self) -> int:
        return int(self.images.shape[0])


def body_mask(ct: CanonicalCT, threshold_hu: float) -> np.ndarray:
    """The patient's body: the largest connected region denser than the threshold.

    An opening of about 5 mm first detaches the couch and blankets.
    """
    dense = sitk.BinaryThreshold(ct.image, lowerThreshold=threshold_hu, upperThreshold=1e9)
    radius = [max(1, int(round(5.0 / s))) for s in ct.image.GetSpacing()[:2]] + [0]
    opened = sitk.BinaryMorphologicalOpening(dense, radius)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(opened), sortByObjectSize=True)
    body = sitk.GetArrayFromImage(components) == 1
    if not body.any():
        raise InputImageError(f"no body found: no region denser than {threshold_hu:.0f} HU")
    return body


def model_grid(ct: CanonicalCT, body: np.ndarray, spec: PreprocessSpec) -> sitk.Image:
    """A square in-plane grid of spec.size pixels around the body, on every slice."""
    _, ys, xs = np.nonzero(body.any(axis=0, keepdims=True))
    corners_index = [(float(xs.min()), float(ys.min()), 0.0), (float(xs.max()), float(ys.max()), 0.0)]
    (x0, y0, _), (x1, y1, _) = [ct.image.TransformContinuousIndexToPhysicalPoint(c) for c in corners_index]
    sx, sy, sz = ct.image.GetSpacing()
    side = max(x1 - x0 + sx, y1 - y0 + sy) + 2 * spec.margin_mm
    pixel = side / spec.size
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    grid = sitk.Image([spec.size, spec.size, ct.image.GetSize()[2]], sitk.sitkUInt8)
    grid.SetSpacing((pixel, pixel, sz))
    grid.SetOrigin((cx - side / 2 + pixel / 2, cy - side / 2 + pixel / 2, ct.image.GetOrigin()[2]))
    return grid


def crop_grid(ct: CanonicalCT, centre_xy_mm: tuple[float, float], side_mm: float, size: int) -> sitk.Image:
    """A square grid of `size` pixels over `side_mm`, centred on the physical (x, y), on every slice."""
    pixel = side_mm / size
    grid = sitk.Image([size, size, ct.image.GetSize()[2]], sitk.sitkUInt8)
    grid.SetSpacing((pixel, pixel, ct.image.GetSpacing()[2]))
    grid.SetOrigin((centre_xy_mm[0] - side_mm / 2 + pixel / 2, centre_xy_mm[1] - side_mm / 2 + pixel / 2,
                    ct.image.GetOrigin()[2]))
    return grid


def prepare_crop(ct: CanonicalCT, spec: PreprocessSpec, centre_xy_mm: tuple[float, float], side_mm: float,
                 body_slices: np.ndarray) -> ModelInput:
    """Filter, resample and window the CT onto a structure-centred crop (`crop_grid`); beyond the scan, air."""
    grid = crop_grid(ct, centre_xy_mm, side_mm, spec.size)
    hu = _resample_to_grid(ct.image, grid, AIR_HU, spec.antialias)
    return ModelInput(spec.window(hu), grid, body_slices, spec)


def mask_centre_mm(mask: np.ndarray, grid: sitk.Image) -> tuple[float, float]:
    """Physical (x, y) centre of a (z, y, x) mask's in-plane bounding box on `grid`."""
    _, ys, xs = np.nonzero(mask)
    index = ((float(xs.min()) + float(xs.max())) / 2, (float(ys.min()) + float(ys.max())) / 2, 0.0)
    x, y, _ = grid.TransformContinuousIndexToPhysicalPoint(index)
    return float(x), float(y)


def _resample_to_grid(image: sitk.Image, grid: sitk.Image, default: float, antialias: bool) -> np.ndarray:
    """Low-pass in-plane (when shrinking) and resample linearly onto the grid."""
    if antialias:
        target = grid.GetSpacing()[0]
        for axis in (0, 1):
            sigma = (target - image.GetSpacing()[axis]) / 2
            if sigma > 0:
                image = sitk.RecursiveGaussian(image, sigma=sigma, direction=axis)
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def prepare(ct: CanonicalCT, spec: PreprocessSpec, body: np.ndarray | None = None) -> ModelInput:
    """Crop, filter, resample and window every axial slice of a canonical CT."""
    body = body_mask(ct, spec.body_threshold_hu) if body is None else body
    grid = model_grid(ct, body, spec)
    hu = _resample_to_grid(ct.image, grid, AIR_HU, spec.antialias)
    return ModelInput(spec.window(hu), grid, np.asarray(body.any(axis=(1, 2))), spec)


def mask_to_grid(mask: np.ndarray, ct: CanonicalCT, grid: sitk.Image) -> np.ndarray:
    """A canonical (z, y, x) binary mask on the model grid (area-weighted, then > 0.5)."""
    image = ct.canonical_like(mask.astype(np.float32))
    fraction = _resample_to_grid(image, grid, 0.0, antialias=True)
    return (fraction > 0.5).astype(np.uint8)


def grid_to_canonical(stack: np.ndarray, model_input: ModelInput, ct: CanonicalCT) -> np.ndarray:
    """Resample a (Z, size, size) float stack (probabilities) onto the canonical CT grid."""
    image = sitk.GetImageFromArray(stack.astype(np.float32))
    image.CopyInformation(model_input.grid)
    resampled = sitk.Resample(image, ct.image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)
