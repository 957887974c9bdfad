"""A registration prior: where a structure lies in a new scan, from a labelled source case.

The network sees one axial slice at a time and nothing tells it where in the
body a structure should be. A labelled source case does: register it to the
query (affine, then a coarse B-spline) and its warped mask is a probability
map of the structure in the query. The engine uses it for the axial window,
crop centres and support levels, and fuses it with the network's output.

Everything happens on small copies (`AtlasImage`, about 4 mm isotropic,
int16 CT and a uint8 occupancy mask), so a support set can keep one per
source case (a few hundred kB) and one registration costs seconds on 2 CPU
cores. What the metric sees is the patient only: voxels outside the body
(the couch, blankets, the -2048 HU reconstruction circle) are set to air
before downsampling, and the fixed mask is the query's body inside the
axial slab the source case covers.

Scans rarely cover the same part of the body (a pelvis against a chest-
abdomen scan share only the upper abdomen, about 100 mm), so the centre of
body mass would pull them hundreds of millimetres apart, and the bone-area
profile (`autocontour.support.localise`) is dominated by contrast in an enhanced scan.
The start is found by `axial_search`: every axial shift that leaves enough
overlap, scored by mutual information at 8 mm, in-plane centres of the body
aligned over the overlapping slab. The affine and B-spline stages then refine
it, sampling only the query's body inside that slab.

SimpleITK does the registration (see docs/how-it-works.md, "The registration"): it is
already a dependency, and at 4 mm its B-spline registration with random
sampling fits the 10 s budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from autocontour.io import CANONICAL_ORIENTATION

ATLAS_SPACING_MM = 4.0
AIR_HU = -1000
BODY_THRESHOLD_HU = -500.0
METRIC_HU_RANGE = (-1000.0, 1500.0)  # contrast boli up to 1300+ HU and metal would dominate the histogram
MASK_SCALE = 255  # uint8 occupancy: 255 = the voxel lies wholly inside the structure
SEARCH_SHRINK = 2  # the axial search runs at twice the atlas spacing
MIN_METRIC_VOXELS = 64  # fewer body voxels in an overlap than this give no similarity to compare
MIN_SMOOTHED_VOXELS = 4  # ITK's recursive Gaussian needs at least this many voxels along an axis
SEARCH_COARSE_STEP_MM, SEARCH_FINE_STEP_MM = 8.0, 2.0
MIN_OVERLAP_MM = 60.0  # shifts leaving less common length are not tried; a shorter scan is not `reliable`
OVERLAP_MARGIN_MM = 12.0  # the fixed mask stops this far inside the slab the source covers
BSPLINE_CONTROL_SPACING_MM = 64.0  # coarse: neighbouring patients differ smoothly; finer grids overfit the bowel
BSPLINE_MAX_DISPLACEMENT_MM = 15.0  # bound on each control point: the affine did the large motion
HISTOGRAM_BINS = 32
# metric samples inside the fixed mask: a fixed count, not a fraction, so that registering a whole scan costs
# what registering a 100 mm overlap does (ITK samples the whole grid and drops points outside the mask)
AFFINE_SAMPLES, BSPLINE_SAMPLES = 10_000, 6_000
MAX_SAMPLING = 0.25
SEED = 20240613  # fixed sampling seed: the same pair registers to the same result
ATLAS_CT_FILE, ATLAS_MASK_FILE = "atlas_ct.nii.gz", "atlas_mask.nii.gz"


def _canonical(image: sitk.Image) -> sitk.Image:
    """LPS axis order (the canonical orientation), keeping the grid; oblique inputs are resampled below."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def _low_res_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """An axis-aligned LPS grid of `spacing_mm` voxels covering `image`'s physical extent."""
    size = np.array(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size - 1)
    world = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners.astype(float)])
    lo, hi = world.min(axis=0), world.max(axis=0)
    new_size = np.maximum(1, np.round((hi - lo) / spacing_mm).astype(int) + 1)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetOrigin(lo.tolist())
    return grid


def _smooth_for(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Gaussian anti-aliasing before downsampling to `spacing_mm` (sigma per axis from the spacing ratio).

    An axis already as coarse as `spacing_mm` (the 4-5 mm in-plane grids of some planning CTs) needs no
    smoothing, and ITK's smoothing filter refuses a zero sigma: such grids are smoothed axis by axis. ITK
    also refuses to smooth an axis of fewer than 4 voxels (a 3-slice scan): such an axis is left as it is.
    """
    sigmas = [max(0.0, (spacing_mm ** 2 - s ** 2)) ** 0.5 / 2.355 if n >= MIN_SMOOTHED_VOXELS else 0.0
              for s, n in zip(image.GetSpacing(), image.GetSize(), strict=True)]
    if min(sigmas) > 0:
        return sitk.SmoothingRecursiveGaussian(image, sigmas)
    for axis, sigma in enumerate(sigmas):
        if sigma > 0:
            image = sitk.RecursiveGaussian(image, sigma=sigma, direction=axis)
    return image


def body_mask_array(hu: np.ndarray) -> np.ndarray:
    """The patient's body on a (z, y, x) HU array: largest region above BODY_THRESHOLD_HU, holes filled
    slice by slice (the lungs and bowel gas are inside the body even though they are air)."""
    dense = hu > BODY_THRESHOLD_HU
    dense = ndimage.binary_opening(dense, structure=np.ones((1, 3, 3), bool))  # detaches a couch that touches
    labels, n = ndimage.label(dense)
    if n == 0:
        return dense
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


def make_atlas_ct(ct: sitk.Image, spacing_mm: float = ATLAS_SPACING_MM) -> sitk.Image:
    """A small copy of a CT for registration: ~`spacing_mm` isotropic LPS, int16 HU, air outside the body.

    Values below air (the -2048 HU reconstruction circle) become air first, so they cannot blur into
    the patient; the body is then found on the small copy and everything outside it (couch, blankets)
    set to AIR_HU.
    """
    ct = sitk.Maximum(sitk.Cast(_canonical(ct), sitk.sitkFloat32), float(AIR_HU))
    grid = _low_res_grid(ct, spacing_mm)
    small = sitk.Resample(_smooth_for(ct, spacing_mm), grid, sitk.Transform(), sitk.sitkLinear, AIR_HU,
                          sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(small)
    hu[~body_mask_array(hu)] = AIR_HU
    out = sitk.GetImageFromArray(np.clip(np.round(hu), -32768, 32767).astype(np.int16))
    out.CopyInformation(grid)
    return out


def make_atlas_mask(mask: sitk.Image | np.ndarray, ct: sitk.Image, atlas_ct: sitk.Image) -> sitk.Image:
    """A binary mask on `ct`'s grid as uint8 occupancy (0..MASK_SCALE) on `atlas_ct`'s grid.

    Occupancy, not nearest neighbour: an adrenal gland or a rib is thinner than one 4 mm voxel and
    would vanish or grow by whole voxels; the fraction keeps its volume and its centre.
    `mask` is a sitk image on `ct`'s grid or a (z, y, x) array on `ct`'s own voxel order.
    """
    if isinstance(mask, np.ndarray):
        array = mask
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(ct)
    binary = sitk.Cast(_canonical(mask) > 0, sitk.sitkFloat32)
    spacing_mm = atlas_ct.GetSpacing()[0]
    fraction = sitk.Resample(_smooth_for(binary, spacing_mm), atlas_ct, sitk.Transform(), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)
    values = np.clip(np.round(sitk.GetArrayViewFromImage(fraction) * MASK_SCALE), 0, MASK_SCALE).astype(np.uint8)
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(atlas_ct)
    return out


@dataclass
class AtlasCase:
    """A source case as a support set keeps it for registration: small CT and the structure's occupancy."""

    ct: sitk.Image  # int16 HU, ATLAS_SPACING_MM, LPS, air outside the body
    mask: sitk.Image  # uint8 occupancy 0..MASK_SCALE on the same grid

    def save(self, folder: Path) -> int:
        """Write the two compressed NIfTI files; returns their size in bytes (for the manifest)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(self.ct, str(folder / ATLAS_CT_FILE), useCompression=True)
        sitk.WriteImage(self.mask, str(folder / ATLAS_MASK_FILE), useCompression=True)
        return sum((folder / f).stat().st_size for f in (ATLAS_CT_FILE, ATLAS_MASK_FILE))

    @classmethod
    def load(cls, folder: Path) -> AtlasCase:
        folder = Path(folder)
        return cls(sitk.ReadImage(str(folder / ATLAS_CT_FILE)), sitk.ReadImage(str(folder / ATLAS_MASK_FILE)))


def make_atlas_case(ct: sitk.Image, mask: sitk.Image | np.ndarray,
                    spacing_mm: float = ATLAS_SPACING_MM) -> AtlasCase:
    """The small copy of a labelled case (see `AtlasCase`); `mask` as in `make_atlas_mask`."""
    atlas_ct = make_atlas_ct(ct, spacing_mm)
    return AtlasCase(atlas_ct, make_atlas_mask(mask, ct, atlas_ct))


@dataclass
class Registration:
    """Source -> query registration on the small grids, and the way to carry masks across."""

    transform: sitk.Transform  # maps query (fixed) points to source (moving) points
    query_grid: sitk.Image  # the query's atlas-resolution image: the default grid of the prior
    diagnostics: dict = field(default_factory=dict)

    @property
    def reliable(self) -> bool:
        """Whether the scans shared enough length to trust the result (MIN_OVERLAP_MM).

        A 20-slice upper-abdomen series (40 mm) matches some level of any longer scan equally well by
        mutual information, so its registration says nothing about which structures are in view; the
        caller should not draw from an unreliable prior.
        """
        return self.diagnostics.get("overlap_mm", 0.0) >= MIN_OVERLAP_MM

    def sampled_on(self, grid: sitk.Image) -> Registration:
        """The same registration with its transform sampled once at every voxel of `grid`.

        Warping onto `grid` then interpolates a stored displacement at each voxel instead of evaluating the
        B-spline there again: 0.07 s a warp against 0.72 s on an OpenKBP model grid, after one sampling
        that costs about one such warp. A scan's structures share one model grid, and a source case is
        warped twice for every structure its sets draw (the mask and its field of view). At the grid's
        voxels the displacement is the transform's own, so the warped masks are the same. Only for warps
        onto `grid`: beyond it ITK's displacement field is the identity.
        """
        displacement = sitk.TransformToDisplacementField(self.transform, sitk.sitkVectorFloat64, grid.GetSize(),
                                                         grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
        return Registration(sitk.DisplacementFieldTransform(displacement), grid, self.diagnostics)

    def warp(self, mask: sitk.Image, reference: sitk.Image | None = None) -> sitk.Image:
        """A source occupancy mask (uint8, AtlasCase.mask) as a float32 probability on `reference`'s grid.

        Default grid: the query's atlas-resolution grid (cheap); pass the query's canonical CT, or a crop
        of it, for the full grid. Outside the source's field of view the probability is 0.
        """
        probability = sitk.Cast(mask, sitk.sitkFloat32) / float(MASK_SCALE)
        return sitk.Resample(probability, reference or self.query_grid, self.transform, sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)


def to_grid(probability: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A prior on the atlas grid carried onto another grid of the query (full resolution, a crop) linearly."""
    return sitk.Resample(probability, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _z_positions(image: sitk.Image) -> np.ndarray:
    return image.GetOrigin()[2] + image.GetSpacing()[2] * np.arange(image.GetSize()[2])


def _centre_xy(image: sitk.Image, body: np.ndarray, z_range: tuple[float, float]) -> np.ndarray:
    """Physical (x, y) centre of the body on the slices within z_range (all slices if the body is not there)."""
    z = _z_positions(image)
    rows = body[(z >= z_range[0]) & (z <= z_range[1])]
    _, ys, xs = np.nonzero(rows if rows.any() else body)
    index = [float(xs.mean()), float(ys.mean()), 0.0]
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index)[:2])


def _body_z(image: sitk.Image, body: np.ndarray) -> np.ndarray:
    """z positions of the slices from the first to the last that show the body (all slices if none does)."""
    z = _z_positions(image)
    shown = np.nonzero(body.any(axis=(1, 2)))[0]
    return z[shown[0]:shown[-1] + 1] if shown.size else z


def _coarse(image: sitk.Image) -> sitk.Image:
    """Half resolution (8 mm for a 4 mm atlas): enough to tell a pelvis from a chest, 8x fewer voxels."""
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), image.GetSpacing()[0])
    return sitk.Shrink(smoothed, [SEARCH_SHRINK] * 3)


def _mask_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(like)
    return mask


@dataclass(frozen=True)
class AxialStart:
    """The axial alignment the search found: z_query = z_source + shift_mm, in-plane offset, metric."""

    shift_mm: float
    offset_xy_mm: tuple[float, float]  # source (x, y) - query (x, y) of the body centres in the overlap
    overlap_mm: tuple[float, float]  # query z range both scans cover
    metric: float


def axial_search(source: sitk.Image, query: sitk.Image) -> AxialStart:
    """Try every axial shift that leaves enough overlap and keep the one with the best mutual information.

    Why a search: scans of different fields of view share only part of the body, and neither the centre
    of body mass nor the bone-area profile (dominated by contrast in an enhanced scan) puts a pelvis scan
    at the right level of a chest-abdomen one; image similarity over the overlap does. In-plane, the body
    centres of the overlapping slabs are aligned for each shift. Coarse step first, then a fine one.
    """
    source8, query8 = _coarse(source), _coarse(query)
    source_body = body_mask_array(sitk.GetArrayViewFromImage(source8))
    query_body = body_mask_array(sitk.GetArrayViewFromImage(query8))
    # shifts are tried over the slices that show the body: a scan padded with air slices (the OpenKBP CTs) would
    # otherwise be tried at shifts where only slivers of the two bodies meet, and a sliver matches by chance
    zs, zq = _body_z(source8, source_body), _body_z(query8, query_body)
    min_overlap = min(MIN_OVERLAP_MM, 0.8 * (zs[-1] - zs[0]), 0.8 * (zq[-1] - zq[0]))
    fixed, moving = _metric_image(query8), _metric_image(source8)
    moving_mask = _mask_image(source_body, source8)

    z_query = _z_positions(query8)

    def evaluate(shift: float) -> AxialStart:
        lo, hi = max(zq[0], zs[0] + shift), min(zq[-1], zs[-1] + shift)
        offset = _centre_xy(source8, source_body, (lo - shift, hi - shift)) - _centre_xy(query8, query_body, (lo, hi))
        in_slab = query_body & ((z_query >= lo) & (z_query <= hi))[:, None, None]
        start = AxialStart(float(shift), (float(offset[0]), float(offset[1])), (float(lo), float(hi)), 0.0)
        if np.count_nonzero(in_slab) < MIN_METRIC_VOXELS:  # no body there (a scan padded with air): no evidence
            return start
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
        method.SetMetricFixedMask(_mask_image(in_slab, query8))
        method.SetMetricMovingMask(moving_mask)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetInitialTransform(sitk.TranslationTransform(3, [float(offset[0]), float(offset[1]), -shift]))
        try:
            return replace(start, metric=method.MetricEvaluate(fixed, moving))
        except RuntimeError:  # the query's body there meets only air padding of the source: no evidence either
            return start

    lowest, highest = zq[0] - zs[-1] + min_overlap, zq[-1] - zs[0] - min_overlap
    coarse = [evaluate(shift) for shift in np.arange(lowest, highest + 1e-6, SEARCH_COARSE_STEP_MM)]
    if not coarse:  # shorter than the minimum overlap either way: centres on each other
        coarse = [evaluate((zq[0] + zq[-1]) / 2 - (zs[0] + zs[-1]) / 2)]
    best = min(coarse, key=lambda s: s.metric)
    fine = [evaluate(best.shift_mm + d) for d in np.arange(-SEARCH_COARSE_STEP_MM, SEARCH_COARSE_STEP_MM + 1e-6,
                                                            SEARCH_FINE_STEP_MM)]
    return min(fine + [best], key=lambda s: s.metric)


def initial_transform(source: sitk.Image, query: sitk.Image) -> tuple[sitk.AffineTransform, tuple[float, float],
                                                                     dict]:
    """Query -> source start for the affine stage, the query z range the source covers, and how it was found."""
    start = axial_search(source, query)
    transform = sitk.AffineTransform(3)
    lo, hi = start.overlap_mm
    transform.SetCenter([0.0, 0.0, (lo + hi) / 2])
    transform.SetTranslation([start.offset_xy_mm[0], start.offset_xy_mm[1], -start.shift_mm])
    how = {"axial_shift_mm": round(start.shift_mm, 1), "search_metric": round(start.metric, 4),
           "overlap_mm": round(hi - lo, 1)}
    return transform, (lo, hi), how


def _fixed_mask(query: sitk.Image, z_range: tuple[float, float]) -> sitk.Image:
    """The query's body within the z range the source covers: where the metric samples.

    Where that range ends at the source scan's edge it stops OVERLAP_MARGIN_MM short (beyond the edge the
    deformed source has no data); where it ends at the query's own edge (a pelvis scan inside a longer source)
    every slice counts: the structures at the scan's ends need the alignment as much as the middle does.
    """
    body = body_mask_array(sitk.GetArrayViewFromImage(query))
    z = _z_positions(query)
    search_voxel = SEARCH_SHRINK * query.GetSpacing()[2]  # the range was found on the search's coarser grid
    below = OVERLAP_MARGIN_MM if z_range[0] > z[0] + search_voxel else 0.0
    above = OVERLAP_MARGIN_MM if z_range[1] < z[-1] - search_voxel else 0.0
    inside = (z >= z_range[0] + below) & (z <= z_range[1] - above)
    if inside.sum() < 3:  # too little overlap for a margin: use what there is
        inside = (z >= z_range[0]) & (z <= z_range[1])
    body &= inside[:, None, None]
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    mask.CopyInformation(query)
    return mask


def _metric_image(image: sitk.Image) -> sitk.Image:
    return sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, *METRIC_HU_RANGE)


def _method(samples: int, fixed_mask: sitk.Image, moving_mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    inside = max(1, int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))))
    sampling = min(MAX_SAMPLING, samples / inside)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)  # contrast phases differ: no intensity identity
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, SEED)
    method.SetMetricFixedMask(fixed_mask)
    method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _bspline_optimizer(method: sitk.ImageRegistrationMethod, iterations: int) -> None:
    method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5, numberOfIterations=iterations, maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=2 * iterations, lowerBound=-BSPLINE_MAX_DISPLACEMENT_MM,
        upperBound=BSPLINE_MAX_DISPLACEMENT_MM)


def _bspline_domain(query: sitk.Image) -> sitk.Image:
    """The part of the query's atlas grid that shows the body, and a voxel around it: the B-spline's domain.

    Control points over the air of a padded scan have nothing to align (the metric samples the body only)
    and cost time: on an OpenKBP grid 692 mm across, mostly air, a registration took 16 s with the mesh
    over the whole grid and 9 s over the body, to the same final metric. Outside its domain the B-spline
    moves nothing and the affine alone maps the air around the body; the step between the two at the
    domain's edge lies a voxel outside the body's widest extent, where no structure is.
    """
    shown = np.nonzero(sitk.GetArrayViewFromImage(query) > AIR_HU)  # (z, y, x); air outside the body is AIR_HU
    if not shown[0].size:
        return query
    lo = [max(0, int(axis.min()) - 1) for axis in reversed(shown)]
    hi = [min(size, int(axis.max()) + 2) for axis, size in zip(reversed(shown), query.GetSize(), strict=True)]
    return query[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def register(source: sitk.Image, query: sitk.Image, deformable: bool = True,
             affine_iterations: int = 200, bspline_iterations: int = 40) -> Registration:
    """Register a source atlas CT (`make_atlas_ct`) to a query atlas CT; both small, LPS, air outside the body.

    Affine (mutual information, 2 resolution levels) from the bone-profile start, then a B-spline on a
    BSPLINE_CONTROL_SPACING_MM control grid (LBFGS-B) unless `deformable` is False.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    fixed, moving = _metric_image(query), _metric_image(source)
    start, z_range, diagnostics = initial_transform(source, query)
    fixed_mask = _fixed_mask(query, z_range)
    moving_mask = sitk.GetImageFromArray(body_mask_array(sitk.GetArrayViewFromImage(source)).astype(np.uint8))
    moving_mask.CopyInformation(source)

    affine_method = _method(AFFINE_SAMPLES, fixed_mask, moving_mask)
    affine_method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=affine_iterations, gradientMagnitudeTolerance=1e-6)
    affine_method.SetOptimizerScalesFromPhysicalShift()
    affine_method.SetShrinkFactorsPerLevel([2, 1])
    affine_method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    affine_method.SetInitialTransform(start, inPlace=True)
    affine_method.Execute(fixed, moving)
    diagnostics["affine_metric"] = round(affine_method.GetMetricValue(), 4)
    diagnostics["affine_s"] = round(time.perf_counter() - started, 2)
    transform: sitk.Transform = sitk.AffineTransform(start)

    if deformable:
        domain = _bspline_domain(query)
        physical = np.array(domain.GetSize()) * np.array(domain.GetSpacing())
        mesh = [max(1, int(round(p / BSPLINE_CONTROL_SPACING_MM))) for p in physical]
        bspline = sitk.BSplineTransformInitializer(domain, mesh, order=3)
        method = _method(BSPLINE_SAMPLES, fixed_mask, moving_mask)
        _bspline_optimizer(method, bspline_iterations)
        method.SetMovingInitialTransform(transform)
        method.SetInitialTransform(bspline, inPlace=True)
        method.Execute(fixed, moving)
        diagnostics["bspline_metric"] = round(method.GetMetricValue(), 4)
        diagnostics["bspline_mesh"] = mesh
        composite = sitk.CompositeTransform(3)
        composite.AddTransform(transform)
        composite.AddTransform(bspline)
        transform = composite
    diagnostics["metric"] = diagnostics.get("bspline_metric", diagnostics["affine_metric"])
    diagnostics["seconds"] = round(time.perf_counter() - started, 2)
    diagnostics["cpu_seconds"] = round(time.process_time() - cpu_started, 2)  # all threads: = wall on an idle core
    registration = Registration(transform, query, diagnostics)
    diagnostics["reliable"] = registration.reliable
    return registration


def registration_prior(source: AtlasCase, query_ct: sitk.Image, reference: sitk.Image | None = None,
                       deformable: bool = True) -> tuple[sitk.Image, Registration]:
    """The source's structure as a probability on the query: (probability image, registration).

    `query_ct`: the query's canonical CT (`CanonicalCT.image`) at full resolution; the prior is returned
    on `reference`'s grid (default: the query's atlas grid). To register several source cases to one
    query, make its atlas CT once with `make_atlas_ct` and call `register` directly.
    """
    registration = register(source.ct, make_atlas_ct(query_ct, source.ct.GetSpacing()[0]), deformable)
    return registration.warp(source.mask, reference), registration
