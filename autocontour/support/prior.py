"""The registration prior of one scan: each support set's source cases registered to it.

A support set of format 2 keeps a small copy of every source case
(`autocontour.support.registration.AtlasCase`). For a new scan the CHOSEN_CASES
source cases most like it are chosen by a cheap global similarity
(`autocontour.support.choice`), so a set of 30 cases costs what a set of 3
does; each chosen case is registered to the scan once, whatever number of
structures its sets contribute (five cervix sets drawn on one patient cost one
registration), and each set's mask is warped onto the structure's model grid.
Several registered cases are fused by majority vote: the prior is the mean of
their warped occupancies, so it reaches 0.5 where most of them put the
structure (a multi-atlas prior). One case misregistered by a vertebra is
outvoted by two that agree, where the union would keep its error and the
intersection would cut the structure short.

The engine reads the prior three ways: which slices to search (where it is
above PRESENT, plus a margin), the structure's axial extent for level-matched
supports, and a probability fused with the network's (`autocontour.engine.fusion`).
A prior knows nothing beyond its source scan's field of view: where a
structure runs off the end of a source scan (the iliopsoas of a chest-abdomen
scan that stops at L3), the slices beyond are searched by the network alone.

A scan that is itself one of the source cases gets no prior from that case,
just as its own slices are left out of its support: otherwise the result
would copy its own label.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from autocontour.io import CanonicalCT
from autocontour.preprocess import ModelInput
from autocontour.support import choice
from autocontour.support.choice import AxialShape, axial_shape, choose_cases
from autocontour.support.registration import (
    MASK_SCALE,
    MIN_OVERLAP_MM,
    Registration,
    make_atlas_ct,
    register,
    to_grid,
)
from autocontour.support.store import SourceCase, SupportSet

PRESENT = 0.05  # a slice whose prior peaks below this is taken not to show the structure
EXTENT = 0.5  # the prior's axial extent: slices where it reaches this
RUNS_OFF_SLICES = 1  # a structure this close to a source scan's end is taken to continue beyond it


@dataclass
class StructurePrior:
    """One structure's prior on its model grid, and where it came from."""

    probability: np.ndarray  # (Z, H, W) float32 on the structure's model grid: mean over source cases
    covered: np.ndarray  # (Z,) bool: slices some source case's field of view reaches; elsewhere it knows nothing
    open_below: bool  # the structure runs off a source scan's inferior end: it may continue below `covered`
    open_above: bool  # ... off its superior end
    cases: list[str]  # source cases registered
    registrations: dict[str, dict] = field(default_factory=dict)  # case -> registration diagnostics
    candidates: int = 0  # source cases with atlas copies the registered ones were chosen from

    @property
    def metric(self) -> float:
        """The registrations' mean final Mattes mutual information (more negative: better aligned)."""
        return float(np.mean([self.registrations[case]["metric"] for case in self.cases]))

    def slices_present(self) -> np.ndarray:
        """(Z,) bool: slices where the prior says the structure may show."""
        return self.probability.max(axis=(1, 2)) >= PRESENT

    def extent(self) -> tuple[int, int] | None:
        """First and last slice where the prior reaches EXTENT (the likely extent), or None."""
        zs = np.nonzero(self.probability.max(axis=(1, 2)) >= EXTENT)[0]
        return (int(zs[0]), int(zs[-1])) if zs.size else None

    def on_grid(self, grid: sitk.Image, target: sitk.Image) -> StructurePrior:
        """The same prior resampled from `grid` (where it lies) onto `target` (a crop with the same slices)."""
        image = sitk.GetImageFromArray(self.probability)
        image.CopyInformation(grid)
        return replace(self, probability=sitk.GetArrayFromImage(to_grid(image, target)))

    def uninformed(self) -> np.ndarray:
        """(Z,) bool: slices beyond the sources' fields of view on a side where the structure runs on:
        the network searches them alone."""
        covered = np.nonzero(self.covered)[0]
        z = np.arange(self.covered.size)
        if covered.size == 0:
            return np.zeros_like(self.covered)
        return ((z < covered[0]) & self.open_below) | ((z > covered[-1]) & self.open_above)

    def describe(self) -> dict:
        return {"source_cases": self.cases, "chosen_from": self.candidates, "registrations": self.registrations,
                "runs_off_source_scan": [side for side, flag in (("inferior", self.open_below),
                                                                 ("superior", self.open_above)) if flag]}


# (scan, source case, spacing) -> its registration, or why it failed
RegistrationCache = dict[tuple[str, str, float], Registration | str]


def registration_priors(canonical: CanonicalCT, supports: dict[str, SupportSet], inputs: dict[str, ModelInput],
                        scan_fingerprint: str, registrations: RegistrationCache | None = None,
                        ) -> tuple[dict[str, StructurePrior], list[str]]:
    """Priors for the structures whose sets carry atlas copies of other cases, and notes on the rest.

    Only the CHOSEN_CASES source cases most like the scan are registered (`autocontour.support.choice`),
    and only `reliable` registrations contribute (enough common length; see `Registration.reliable`).
    `registrations` keeps them across calls (a scan segmented again, or in several calls, is registered
    once per source case); by default they last this call.
    """
    if (too_short := _too_short_to_register(canonical, supports)) is not None:
        return {}, [too_short]
    query = _QueryAtlas(canonical)
    registrations = {} if registrations is None else registrations
    sampled = _SampledRegistrations()
    priors: dict[str, StructurePrior] = {}
    notes: list[str] = []
    for name, support in supports.items():
        fused = _FusedCases()
        chosen, candidates = _chosen_cases(support, scan_fingerprint, query)
        for case in chosen:
            assert case.atlas is not None  # only cases with atlas copies are chosen
            spacing = case.atlas.spacing_mm
            key = (scan_fingerprint, case.fingerprint, spacing)
            if key not in registrations:
                registrations[key] = _register_or_reason(support.atlas_cases()[case.case].ct, query.atlas(spacing))
            registration = registrations[key]
            if isinstance(registration, str):
                notes.append(f"{name}: source case {case.case} did not register to the scan ({registration}); "
                             "it adds no registration prior")
                continue
            grid = inputs[name].grid
            if registration.reliable:  # an unreliable one is not warped at all (`_FusedCases.add`)
                registration = sampled.on(key, registration, grid)
            fused.add(case, support.atlas_cases()[case.case].mask, registration, grid)
        if fused.warped:
            priors[name] = fused.prior(candidates)
        elif fused.diagnostics:
            notes.append(f"{name}: no registration prior: the scan shares too little length with the source "
                         "case(s) to register reliably")
    return priors, notes


def _too_short_to_register(canonical: CanonicalCT, supports: dict[str, SupportSet]) -> str | None:
    """Why no source case is registered to a scan shorter than MIN_OVERLAP_MM (such a registration is never
    `reliable`, and ITK cannot even smooth a scan of 3 slices), when some set has source cases to register."""
    length = float(np.ptp(canonical.slice_positions_mm()))
    if length >= MIN_OVERLAP_MM or not any(case.atlas is not None for support in supports.values()
                                           for case in support.manifest.source_cases):
        return None
    return (f"the scan is {length:.0f} mm long, shorter than the {MIN_OVERLAP_MM:.0f} mm a registration prior needs: "
            "no source case was registered to it")


class _SampledRegistrations:
    """Each registration sampled on each model grid once (`Registration.sampled_on`), for one call.

    A sampled displacement takes 24 bytes a voxel of the model grid (ITK's displacement fields are float64),
    about 50 MB for a 128 x 128 x 128 grid, so it lasts this call only; one is kept per chosen case and
    grid (three when the sets were drawn on the same patients), beside the warped masks `_FusedCases`
    keeps (8 bytes a voxel per case and structure).
    """

    def __init__(self) -> None:
        self._sampled: dict[tuple[tuple[str, str, float], tuple, tuple, tuple, tuple], Registration] = {}

    def on(self, key: tuple[str, str, float], registration: Registration, grid: sitk.Image) -> Registration:
        cache_key = (key, grid.GetSize(), grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
        if cache_key not in self._sampled:
            self._sampled[cache_key] = registration.sampled_on(grid)
        return self._sampled[cache_key]


class _QueryAtlas:
    """The scan's atlas CT and its axial shape, made once per atlas spacing."""

    def __init__(self, canonical: CanonicalCT):
        self.canonical = canonical
        self._atlas: dict[float, sitk.Image] = {}
        self._shape: dict[float, AxialShape] = {}

    def atlas(self, spacing: float) -> sitk.Image:
        if spacing not in self._atlas:
            self._atlas[spacing] = make_atlas_ct(self.canonical.image, spacing)
        return self._atlas[spacing]

    def shape(self, spacing: float) -> AxialShape:
        if spacing not in self._shape:
            self._shape[spacing] = axial_shape(self.atlas(spacing))
        return self._shape[spacing]


def _chosen_cases(support: SupportSet, scan_fingerprint: str, query: _QueryAtlas) -> tuple[list[SourceCase], int]:
    """The set's source cases to register: the CHOSEN_CASES most like the scan among those with atlas copies,
    never the scan itself (its prior would copy its own label); and how many there were to choose from."""
    candidates = {c.case: c for c in support.manifest.source_cases
                  if c.atlas is not None and c.fingerprint != scan_fingerprint}
    chosen = choice.CHOSEN_CASES  # read at call time: bench/clinic.py --chosen-cases sets it
    if len(candidates) <= chosen:
        return list(candidates.values()), len(candidates)
    atlases = support.atlas_cases()
    shapes = {case: axial_shape(atlases[case].ct) for case in candidates}
    spacing = next(iter(shapes.values())).spacing_mm
    return [candidates[case] for case in choose_cases(query.shape(spacing), shapes, chosen)], len(candidates)


@dataclass
class _FusedCases:
    """The registered source cases of one structure, warped onto its model grid, fused by majority vote:
    the prior is the mean of their occupancies, so it reaches 0.5 where most cases put the structure."""

    warped: list[np.ndarray] = field(default_factory=list)
    coverage: list[np.ndarray] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    diagnostics: dict[str, dict] = field(default_factory=dict)
    open_below: bool = False
    open_above: bool = False

    def add(self, case: SourceCase, mask: sitk.Image, registration: Registration, grid: sitk.Image) -> None:
        """One registered case: its warped mask and field of view (if the registration is reliable)."""
        self.diagnostics[case.case] = registration.diagnostics
        if not registration.reliable:
            return
        self.warped.append(sitk.GetArrayFromImage(registration.warp(mask, grid)))
        field_of_view = sitk.Image(mask.GetSize(), sitk.sitkUInt8) + MASK_SCALE
        field_of_view.CopyInformation(mask)
        self.coverage.append(sitk.GetArrayFromImage(registration.warp(field_of_view, grid)).max(axis=(1, 2)) >= 0.5)
        self.open_below |= case.extent_slices[0] <= RUNS_OFF_SLICES
        self.open_above |= case.extent_slices[1] >= case.num_slices - 1 - RUNS_OFF_SLICES
        self.cases.append(case.case)

    def prior(self, candidates: int) -> StructurePrior:
        return StructurePrior(np.mean(self.warped, axis=0).astype(np.float32), np.any(self.coverage, axis=0),
                              self.open_below, self.open_above, self.cases, self.diagnostics, candidates)


def _register_or_reason(source: sitk.Image, query: sitk.Image) -> Registration | str:
    """The registration, or why ITK gave up (e.g. too little body in common), kept in the cache like a
    registration so the sets that share the source case do not try again."""
    try:
        return register(source, query)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]  # ITK's last line says why
        return lines[-1] if lines else type(exc).__name__
