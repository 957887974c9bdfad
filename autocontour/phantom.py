"""Synthetic pelvic CT phantoms with known labels, on any grid.

Real labelled pelvic CTs are scarce (the repository ships one), so tests and
training also use phantoms: a random pelvis-like anatomy defined in patient
coordinates (LPS, millimetres), sampled on whatever grid is asked for. The
anatomy lives in physical space, so the same seed on a 3 mm RAS grid and a
1 mm LPS grid gives the same patient, and a pipeline that mishandles
orientation or spacing is caught.

Label values follow TotalSegmentator's where a structure exists there (so the
shipped recipes work on phantoms unchanged); the female organs get values of
their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

LABELS = {
    "urinary_bladder": 104, "colon": 57, "small_bowel": 55, "sacrum": 92, "hip_left": 90, "hip_right": 91,
    "femur_left": 88, "femur_right": 89, "iliac_artery_left": 51, "iliac_artery_right": 52,
    "iliac_vena_left": 53, "iliac_vena_right": 54, "iliopsoas_left": 102, "iliopsoas_right": 103,
    "gluteus_maximus_left": 94, "gluteus_maximus_right": 95, "uterus": 200, "cervix": 201,
}


@dataclass
class Phantom:
    ct: sitk.Image  # float32 HU
    labels: sitk.Image  # uint8 label map on the same grid
    names: dict[str, int]  # label name -> value


def orientation_direction(code: str) -> np.ndarray:
    """Direction matrix for a DICOM-style orientation code such as "LPS" or "RAS"."""
    axes = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
    direction = np.zeros((3, 3))
    for column, letter in enumerate(code.upper()):
        row, sign = axes[letter]
        direction[row, column] = sign
    return direction


def _grid(size, spacing, direction: np.ndarray, centre_mm) -> tuple[sitk.Image, np.ndarray, np.ndarray, np.ndarray]:
    """An empty image centred on `centre_mm` and the LPS coordinates of its voxels (z, y, x arrays)."""
    size = np.asarray(size)
    spacing = np.asarray(spacing, dtype=float)
    half = direction @ ((size - 1) * spacing / 2)
    origin = np.asarray(centre_mm) - half
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(origin.tolist())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")  # array order (z, y, x)
    index = np.stack([i, j, k], axis=-1) * spacing
    world = origin + index @ direction.T
    return image, world[..., 0], world[..., 1], world[..., 2]


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2 <= 1)


def _tube(x, y, z, points: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` of a polyline given by points (N, 3) sampled densely along z."""
    zs = points[:, 2]
    inside = (z >= zs.min() - radius) & (z <= zs.max() + radius)
    cx = np.interp(z, zs, points[:, 0])
    cy = np.interp(z, zs, points[:, 1])
    return inside & ((x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2)


TOP_MM, BOTTOM_MM = 80.0, -80.0  # where the vessels and the psoas enter and leave the pelvis


@dataclass
class _Canvas:
    """The phantom being painted: voxel coordinates, HU and labels, and the one random stream every step
    draws from in turn (so a seed gives the same patient on any grid)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    rng: np.random.Generator
    hu: np.ndarray
    labels: np.ndarray

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def paint(self, mask: np.ndarray, value: float, label: str | None = None) -> None:
        self.hu[mask] = value
        if label:
            self.labels[mask] = LABELS[label]

    def ellipsoid(self, centre, radii) -> np.ndarray:
        return _ellipsoid(self.x, self.y, self.z, centre, radii)

    def tube(self, points: np.ndarray, radius: float) -> np.ndarray:
        return _tube(self.x, self.y, self.z, points, radius)


def make_phantom(seed: int = 0, size=(96, 80, 40), spacing=(4.0, 4.0, 4.0), orientation: str = "LPS",
                 direction: np.ndarray | None = None, female: bool = True, noise_hu: float = 15.0) -> Phantom:
    """A random pelvis on the requested grid.

    `orientation` is a code such as "LPS" or "RAS"; `direction` (3x3) overrides it,
    e.g. for an oblique grid. The field of view is centred on the pelvis.
    """
    rng = np.random.default_rng(seed)
    direction = orientation_direction(orientation) if direction is None else np.asarray(direction, dtype=float)
    image, x, y, z = _grid(size, spacing, direction, centre_mm=(0.0, 0.0, 0.0))
    canvas = _Canvas(x, y, z, rng, np.full(x.shape, -1000.0, dtype=np.float32), np.zeros(x.shape, dtype=np.uint8))
    body = _paint_body(canvas)
    for side, sign in (("left", 1), ("right", -1)):
        _paint_side(canvas, body, side, sign)
    bladder, colon = _paint_pelvic_organs(canvas)
    if female:
        _paint_female_organs(canvas, bladder, colon)
    _paint_small_bowel(canvas, body)

    hu = ndimage.gaussian_filter(canvas.hu, 0.6) + rng.normal(0, noise_hu, canvas.hu.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(hu.astype(np.float32))
    ct.CopyInformation(image)
    label_image = sitk.GetImageFromArray(canvas.labels)
    label_image.CopyInformation(image)
    present = {name: value for name, value in LABELS.items() if (canvas.labels == value).any()}
    return Phantom(ct, label_image, present)


def _paint_body(c: _Canvas) -> np.ndarray:
    """Fat under the skin, soft tissue inside; returns the body."""
    body_ax, body_ay = c.u(150, 185), c.u(100, 125)
    body = (c.x / body_ax) ** 2 + ((c.y - 5) / body_ay) ** 2 <= 1
    c.paint(body, c.u(-110, -80))
    c.paint((c.x / (body_ax - 15)) ** 2 + ((c.y - 5) / (body_ay - 15)) ** 2 <= 1, c.u(20, 45))
    return body


def _paint_side(c: _Canvas, body: np.ndarray, side: str, sign: int) -> None:
    """One side's hip, femur, muscles and iliac vessels (with or without contrast)."""
    hip_c = (sign * c.u(95, 110), c.u(0, 15), c.u(10, 30))
    c.paint(c.ellipsoid(hip_c, (c.u(18, 25), c.u(35, 45), c.u(50, 60))), c.u(350, 700), f"hip_{side}")
    femur_c = (sign * c.u(85, 100), c.u(-5, 10), c.u(-70, -55))
    c.paint(c.ellipsoid(femur_c, (22, 22, 24)), c.u(300, 600), f"femur_{side}")
    psoas = c.tube(np.array([[sign * 45, 35, TOP_MM], [sign * 70, 10, -20]], dtype=float), c.u(14, 20))
    c.paint(psoas & body, c.u(45, 60), f"iliopsoas_{side}")
    glute = c.ellipsoid((sign * 75, 85, -20), (45, 25, 50)) & body
    c.paint(glute, c.u(45, 60), f"gluteus_maximus_{side}")
    contrast = c.u(0, 1) > 0.5
    vessel_hu = c.u(180, 260) if contrast else c.u(35, 50)
    artery = np.array([[sign * 8, 20, TOP_MM], [sign * c.u(40, 55), 15, 10], [sign * c.u(75, 85), -5, BOTTOM_MM]],
                      float)
    vein = artery + np.array([-sign * 8, 12, -5])
    c.paint(c.tube(vein, c.u(6, 8)), vessel_hu - 30, f"iliac_vena_{side}")
    c.paint(c.tube(artery, c.u(4, 6)), vessel_hu, f"iliac_artery_{side}")


def _paint_pelvic_organs(c: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    """Sacrum, bladder and rectum (sometimes with gas); returns the bladder and the colon."""
    c.paint(c.ellipsoid((0, c.u(75, 90), c.u(20, 40)), (c.u(35, 45), c.u(18, 24), c.u(45, 55))), c.u(350, 600),
            "sacrum")
    bladder_c = (c.u(-8, 8), c.u(-50, -35), c.u(-40, -20))
    bladder = c.ellipsoid(bladder_c, (c.u(30, 50), c.u(22, 35), c.u(22, 35)))
    c.paint(bladder, c.u(0, 15), "urinary_bladder")
    rectum_y = c.u(45, 55)
    rectum = np.array([[c.u(-5, 5), rectum_y, BOTTOM_MM - 10], [c.u(-5, 5), rectum_y, 0],
                       [c.u(15, 30), rectum_y - 25, c.u(25, 40)]], dtype=float)
    rectum_radius = c.u(11, 16)
    colon = c.tube(rectum, rectum_radius)
    c.paint(colon, c.u(30, 45), "colon")
    if c.rng.uniform() > 0.4:  # gas in the lumen
        c.paint(c.tube(rectum, rectum_radius * 0.5) & (c.z > c.u(-60, -20)), -700.0, "colon")
    return bladder, colon


def _paint_female_organs(c: _Canvas, bladder: np.ndarray, colon: np.ndarray) -> None:
    """Uterus and cervix, behind the bladder and beside the colon."""
    uterus_c = (c.u(-10, 10), c.u(-5, 10), c.u(5, 25))
    c.paint(c.ellipsoid(uterus_c, (c.u(25, 35), c.u(18, 25), c.u(30, 40))) & ~bladder, c.u(45, 60), "uterus")
    cervix_c = (uterus_c[0], uterus_c[1] + 10, uterus_c[2] - 38)
    c.paint(c.ellipsoid(cervix_c, (15, 15, 14)) & ~bladder & ~colon, c.u(40, 55), "cervix")


def _paint_small_bowel(c: _Canvas, body: np.ndarray) -> None:
    """A few small bowel loops above the bladder, where nothing else lies."""
    for _ in range(int(c.rng.integers(3, 7))):
        centre = (c.u(-60, 60), c.u(-60, 10), c.u(30, 80))
        loop = c.ellipsoid(centre, (c.u(10, 20), c.u(10, 20), c.u(10, 25))) & (c.labels == 0) & body
        c.paint(loop, c.u(20, 40), "small_bowel")


def save_phantom(folder, seed: int, **kwargs):
    """Write a phantom as ct.nii.gz, labels.nii.gz and labels.json in `folder`; returns the two image paths."""
    phantom = make_phantom(seed, **kwargs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct, labels = folder / "ct.nii.gz", folder / "labels.nii.gz"
    sitk.WriteImage(phantom.ct, str(ct), useCompression=True)
    sitk.WriteImage(phantom.labels, str(labels), useCompression=True)
    (folder / "labels.json").write_text(json.dumps({str(v): k for k, v in phantom.names.items()}, indent=1))
    return ct, labels
