"""Which slices to segment, with which examples: the in-context part of inference.

For every requested structure:

0. Localisation. The support set's bone profiles are matched to the scan's
   (autocontour.support.localise): a window along z to search, the verdict that the
   structure lies outside the scan or that the scan is too short to tell
   (nothing is searched or drawn), or the whole body when no match can be
   trusted. `axial_search="all"` ignores it.
1. Coarse pass. Every few millimetres (`coarse_step_mm`) through the body,
   segment the slice with a support set spread over the structure's whole
   extent. The longest run of slices where the structure shows (by area)
   gives its axial extent; no work is spent on slices far outside it.
2. Fine pass. Every slice from one coarse step below to one above that
   extent is segmented by an ensemble of K support sets of S slices. With
   `support_selection="level"` each query gets the examples nearest to its
   own relative level in the structure (the top of the bladder is segmented
   from examples of bladder tops); the K members draw different subsets of
   the nearest examples, and their disagreement feeds the confidence.
   When the set has several source cases, the examples come from the cases
   whose slices at that level look most like the query slice (normalised
   cross-correlation of the 32x32 model images): anatomy that matches, not
   only the same relative level (autocontour.engine.selection).
3. Other planes (`planes="three"`, autocontour.engine.planes). Coronal and sagittal
   cuts across the structure's likely region are segmented from examples
   cut from the set's atlas copies, and the three probabilities averaged.

With a registration prior (`autocontour.support.prior`: the set's source cases
registered to the scan), the prior replaces steps 0 and 1: its slices (plus
a margin) are the window, its extent sets the levels, and the fine pass's
probability is fused with it: p = (1 - w) * p_network * gate + w * p_prior,
where the gate keeps the network's answer only within `prior_gate_mm` of the
prior's likely region. w follows the registration's quality (its final Mattes
mutual information, `prior_weight_for`): a source that aligned well is
trusted more than the network, one that aligned poorly less. Where the
network draws almost nothing where the prior places the structure (less than
`NETWORK_SILENT_SHARE` of the prior's likely volume), a poorly aligned prior
alone could not reach the threshold and the result would be empty: the prior
is drawn alone (weight 1), nothing is drawn beyond the sources' field of view
(the network failed where it could be checked), and the summary says so. The
weights, the gate and that share were measured on bench/cross_patient.py
(autocontour.engine.fusion).

With `crops` and a support set of format 2 that stores them, the fine pass
looks closer: each slice is a square of the set's side (mm) centred on the
structure, found by the prior (or, without one, by the coarse pass), at the
scale the set's examples show it; the result maps back onto the CT's grid
through the crop's geometry. Without a centre it falls back to the whole view.

Requests of all structures go to the runner together, so batches stay full.
If the CT is itself one of a support set's source cases, the query's own
slice and its neighbours are left out of its support (leave-slice-out), so a
result never copies its own label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

from autocontour.engine.fusion import fuse_prediction, prior_weight_for, prior_window
from autocontour.engine.planes import (
    OTHER_PLANES,
    PlaneQuery,
    atlas_examples,
    plane_mean,
    plane_queries,
    slice_z_mm,
    uncut,
)
from autocontour.engine.prediction import StructurePrediction
from autocontour.engine.runner import Engine
from autocontour.engine.selection import (
    LEAVE_OUT_RADIUS,
    SupportPool,
    allowed_slices,
    level_members,
    spread_members,
    thumbnails,
)
from autocontour.errors import OptionError
from autocontour.options import ResolvedOptions
from autocontour.overlap import dice
from autocontour.preprocess import ModelInput, mask_centre_mm
from autocontour.support.localise import Localisation, Profile, localise
from autocontour.support.prior import PRESENT, StructurePrior
from autocontour.support.store import SupportSet

MIN_FOREGROUND_PIXELS = 4

# progress(phase, requests done per structure, requests in total per structure)
ProgressCallback = Callable[[str, dict[str, int], dict[str, int]], None]
# crop_view(structure, centre (x, y) mm, side mm): the scan prepared on a structure-centred crop
CropView = Callable[[str, tuple[float, float], float], ModelInput]


@dataclass
class _Request:
    structure: str
    z: int
    member: int
    index: np.ndarray  # (S,) indices into the joint pool
    crop: bool = False  # query and supports from the structure-centred crops


def _step_slices(model_input: ModelInput, step_mm: float) -> int:
    return max(1, int(round(step_mm / model_input.grid.GetSpacing()[2])))


def _bone_localisation(support: SupportSet, query: Profile | None, scan_mm: tuple[float, float]) -> Localisation:
    """Where along z to search the scan for the set's structure (autocontour.support.localise.localise)."""
    cases = [(Profile.from_dict(c.bone_profile), cast(tuple[float, float], tuple(c.extent_mm)))
             for c in support.manifest.source_cases if c.bone_profile and c.extent_mm]
    if query is None:
        return Localisation("whole_body", "no bone profile of the scan: the whole body was searched")
    return localise(cases, query, scan_mm)


class _StructurePlan:
    """One structure's way through the passes: where to search, its requests, and what came back.

    `predict_structures` runs the passes for all structures together (one runner call per pass, so
    batches stay full); each plan says what it needs and takes its answers.
    """

    def __init__(self, name: str, support: SupportSet, model_input: ModelInput, options: ResolvedOptions,
                 fingerprint: str | None):
        self.name, self.support, self.input, self.options = name, support, model_input, options
        self.own = {c.case for c in support.manifest.source_cases if c.fingerprint == fingerprint}
        usable = len(support) - (2 * LEAVE_OUT_RADIUS + 1 if self.own else 0)
        if usable < 1:
            raise OptionError(f"support set {support.id} has too few slices ({len(support)}) to segment with")
        size = min(options.support_size, usable)
        z_count = model_input.num_slices
        self.prediction = StructurePrediction(
            probability=np.zeros((z_count, *model_input.images.shape[1:]), dtype=np.float32),
            agreement=np.ones(z_count, dtype=np.float32), computed=np.zeros(z_count, dtype=bool),
            extent=None, support_size=size, ensemble=options.ensemble)
        if size < options.support_size:
            self.prediction.warnings.append(f"support size reduced to {size}: the support set has {len(support)} "
                                            "slices")
        if self.own:
            self.prediction.warnings.append(
                "this CT is a source case of the support set: each slice's own label and its neighbours' were left out")
        self.searched = np.zeros(0, dtype=int)
        self.coarse: dict[int, np.ndarray] = {}  # coarse slice -> probability
        self.fine: dict[int, list[np.ndarray]] = {}  # fine slice -> one probability per ensemble member

    @property
    def view(self) -> ModelInput:
        """The grid the fine pass runs on: the structure-centred crop, or the whole-body view."""
        return self.prediction.view or self.input

    def localise(self, profile: Profile | None, prior: StructurePrior | None) -> None:
        """Step 0: the slices to search, from the registration prior or the bone profile."""
        prediction, grid = self.prediction, self.input.grid
        z_mm = grid.GetOrigin()[2] + grid.GetSpacing()[2] * np.arange(self.input.num_slices)
        inside = self.input.body_slices.copy()
        located = _bone_localisation(self.support, profile, (float(z_mm[0]), float(z_mm[-1])))
        if prior is not None:
            prediction.prior = prior
            prediction.prior_weight = (self.options.prior_weight if self.options.prior_weight is not None
                                       else prior_weight_for(prior.metric))
            located = prior_window(prior, z_mm, located)
        prediction.localisation = located
        if self.options.axial_search == "all":
            if located.verdict != "whole_body":
                prediction.warnings.append("--axial-search all: every body slice was searched, whatever the skeleton "
                                           "match said" + (f" ({located.reason})" if located.reason else ""))
        elif located.verdict == "window":
            assert located.window_mm is not None  # the "window" verdict always carries its window
            inside &= (z_mm >= located.window_mm[0]) & (z_mm <= located.window_mm[1])
            prediction.window_mm = (round(located.window_mm[0], 1), round(located.window_mm[1], 1))
        elif located.verdict in ("not_in_scan", "too_short"):
            inside[:] = False
        elif located.reason is not None:
            prediction.warnings.append(located.reason)
        self.searched = np.nonzero(inside)[0]
        if self.searched.size:
            prediction.searched_mm = (round(float(z_mm[self.searched[0]]), 1),
                                      round(float(z_mm[self.searched[-1]]), 1))

    def coarse_requests(self, rng: np.random.Generator, offset: int) -> list[_Request]:
        """Step 1: every few millimetres through the searched slices (none where the prior gives the extent)."""
        body = self.searched
        if body.size == 0 or self.prediction.prior is not None:
            return []
        size = min(self.options.coarse_support_size, self.prediction.support_size)
        requests = []
        for z in np.unique(np.append(body[:: _step_slices(self.input, self.options.coarse_step_mm)], body[-1:])):
            member = spread_members(self.support.levels, allowed_slices(self.support, z, self.own), size, 1, rng)[0]
            requests.append(_Request(self.name, int(z), 0, member + offset))
        return requests

    def fine_requests(self, rng: np.random.Generator, offset: int, crop_view: CropView | None) -> list[_Request]:
        """Step 2: the structure's extent (from the prior or the coarse pass), each slice with its examples."""
        options, prediction, support, body = self.options, self.prediction, self.support, self.searched
        step = _step_slices(self.input, options.coarse_step_mm)
        found = _main_run({z: int((p > 0.5).sum()) for z, p in self.coarse.items()}, step)
        if prediction.prior is not None:
            prediction.extent = prediction.prior.extent()
            found = list(prediction.extent) if prediction.extent else []
        elif found:
            prediction.extent = (found[0], found[-1])
        if options.axial_search == "all" or prediction.prior is not None:
            queries = body
        elif found:
            queries = body[(body >= found[0] - step) & (body <= found[-1] + step)]
        else:
            queries = body[:0]
        lo, hi = prediction.extent or ((int(body[0]), int(body[-1])) if body.size else (0, 1))
        crop = options.crops and _place_crop(prediction, support, self.input, self.coarse, found, crop_view,
                                             self.name)
        case_of = np.array([m.case for m in support.manifest.slices])
        examples = support.crop_images if crop and support.crop_images is not None else support.images
        example_thumbnails = thumbnails(examples) if len(set(case_of)) > 1 and queries.size else None
        query_thumbnails = thumbnails(self.view.images[queries]) if example_thumbnails is not None else None
        used: Counter[str] = Counter()
        requests: list[_Request] = []
        for i, z in enumerate(queries):
            allowed = allowed_slices(support, int(z), self.own)
            if options.support_selection == "level":
                similarity = (example_thumbnails @ query_thumbnails[i]
                              if example_thumbnails is not None and query_thumbnails is not None else None)
                members = level_members(support.levels, allowed, (z - lo) / max(hi - lo, 1),
                                         prediction.support_size, options.ensemble, rng, case_of, similarity)
            else:
                members = spread_members(support.levels, allowed, prediction.support_size, options.ensemble, rng)
            used.update(case_of[np.concatenate(members)].tolist())
            requests += [_Request(self.name, int(z), k, m + offset, crop) for k, m in enumerate(members)]
        prediction.computed[queries] = True
        prediction.cases_used = dict(sorted(used.items()))
        if prediction.prior_weight == 1.0:  # the prior alone: no network work
            return []
        return requests

    def average_members(self) -> None:
        """The fine pass's members averaged per slice, and their agreement."""
        prediction = self.prediction
        for z, members in self.fine.items():
            prediction.probability[z] = np.mean(members, axis=0)
            prediction.agreement[z] = _agreement([m > 0.5 for m in members])
        prediction.planes = {"axial": int(prediction.computed.sum())}

    def other_plane_queries(self) -> list[PlaneQuery]:
        """Step 3 (`planes="three"`): coronal and sagittal cuts across the likely region (the fine pass's
        mask and the prior's), with examples cut from the set's atlas copies."""
        prediction, support = self.prediction, self.support
        if self.options.planes != "three" or not prediction.computed.any() or prediction.prior_weight == 1.0:
            return []
        if prediction.view is not None:
            prediction.warnings.append("three planes run on the whole-body view only: the fine pass on the crop "
                                       "was axial alone")
            return []
        region = (prediction.probability >= 0.5) & prediction.computed[:, None, None]
        if prediction.prior is not None:
            region |= prediction.prior.probability >= 0.5
        atlases = [atlas for case, atlas in support.atlas_cases().items() if case not in self.own]
        if not region.any() or not atlases:
            if not atlases:
                prediction.warnings.append("no atlas copies to cut coronal and sagittal examples from (a format-1 "
                                           "set, or only this scan's own): axial alone")
            return []
        spec = support.manifest.preprocessing
        examples = {plane: [e for atlas in atlases if (e := atlas_examples(atlas, spec, plane)) is not None]
                    for plane in OTHER_PLANES}
        return plane_queries(self.input, region, examples, prediction.support_size)

    def finish(self, pairs: int, planes: list[tuple[str, np.ndarray, np.ndarray]]) -> StructurePrediction:
        """The other planes' cuts averaged in, and the fusion with the prior."""
        prediction = self.prediction
        if planes:
            prediction.probability = plane_mean(prediction.probability, prediction.computed,
                                                [(volume, reached) for _, volume, reached in planes])
        if prediction.prior is not None:
            fuse_prediction(prediction, self.view, self.options)
        prediction.queries = int(prediction.computed.sum())
        prediction.pairs = pairs
        return prediction


def predict_structures(engine: Engine, inputs: dict[str, ModelInput], supports: dict[str, SupportSet],
                       options: ResolvedOptions, fingerprint: str | None = None,
                       progress: ProgressCallback | None = None, profile: Profile | None = None,
                       priors: dict[str, StructurePrior] | None = None,
                       crop_view: CropView | None = None) -> dict[str, StructurePrediction]:
    """Coarse then fine pass for every structure; see the module docstring.

    `profile` is the query's bone profile; with it each structure is searched only
    where the skeleton says it can be (autocontour.support.localise). `priors` are the
    registration priors on the model grids (autocontour.support.prior); `crop_view`
    prepares the structure-centred crops of sets that store them.
    """
    priors = priors or {}
    pools = SupportPool(supports, options.crops)
    rng = np.random.default_rng(options.seed)
    plans = {name: _StructurePlan(name, support, inputs[name], options, fingerprint)
             for name, support in supports.items()}
    for name, plan in plans.items():
        plan.localise(profile, priors.get(name))

    coarse_requests = [r for plan in plans.values() for r in plan.coarse_requests(rng, pools.offset[plan.name])]
    for request, probability in zip(coarse_requests, _run(engine, inputs, pools, coarse_requests, "coarse",
                                                          progress), strict=True):
        plans[request.structure].coarse[request.z] = probability

    fine_requests = [r for plan in plans.values()
                     for r in plan.fine_requests(rng, pools.offset[plan.name], crop_view)]
    views = {name: plan.view for name, plan in plans.items()}
    for request, probability in zip(fine_requests, _run(engine, views, pools, fine_requests, "fine", progress),
                                    strict=True):
        plans[request.structure].fine.setdefault(request.z, []).append(probability)

    pairs = Counter[str]()
    for request in coarse_requests + fine_requests:
        pairs[request.structure] += request.index.size
    for plan in plans.values():
        plan.average_members()
    planes = _other_planes(engine, plans, pairs, progress)
    return {name: plan.finish(pairs[name], planes.get(name, [])) for name, plan in plans.items()}


def _other_planes(engine: Engine, plans: dict[str, _StructurePlan], pairs: Counter[str],
                  progress: ProgressCallback | None) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """Step 3 for every structure: (plane, probability on the view, slices reached) per plane segmented."""
    queries = {name: plan.other_plane_queries() for name, plan in plans.items()}
    total = {name: sum(len(q.positions) for q in qs) for name, qs in queries.items() if qs}
    done = dict.fromkeys(total, 0)
    out: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for name, structure_queries in queries.items():
        view = plans[name].input
        for query in structure_queries:
            probability = engine.predict(query.images, query.pool, query.index)
            volume, reached = uncut(probability, query.rows_mm, query.plane, query.positions, slice_z_mm(view),
                                    view.images.shape)
            out.setdefault(name, []).append((query.plane, volume, reached))
            plans[name].prediction.planes[query.plane] = len(query.positions)
            pairs[name] += query.index.size
            done[name] += len(query.positions)
            if progress:
                progress("planes", dict(done), total)
    return out


def _place_crop(prediction: StructurePrediction, support: SupportSet, model_input: ModelInput,
                coarse: dict[int, np.ndarray], found: list[int], crop_view: CropView | None, name: str) -> bool:
    """Centre the set's crop on the structure (the prior's likely region, else the coarse pass's detections
    in the structure's run) and prepare the scan on it; the prior follows onto the crop. False: no crop."""
    if support.manifest.crop is None or crop_view is None:
        return False
    if prediction.prior is not None:
        probability = prediction.prior.probability
        region = probability >= 0.5 if (probability >= 0.5).any() else probability >= PRESENT
        placed_by = "registration prior"
    else:
        region = np.zeros(model_input.images.shape, dtype=bool)
        for z, p in coarse.items():
            if found and found[0] <= z <= found[-1]:
                region[z] |= p > 0.5
        placed_by = "coarse pass"
    if not region.any():
        prediction.warnings.append("no centre for the structure-centred crop: the fine pass used the whole view")
        return False
    centre = mask_centre_mm(region, model_input.grid)
    side = support.manifest.crop.side_mm
    prediction.view = crop_view(name, centre, side)
    if prediction.prior is not None:
        prediction.prior = prediction.prior.on_grid(model_input.grid, prediction.view.grid)
    prediction.crop = {"side_mm": side, "centre_xy_mm": [round(c, 1) for c in centre], "placed_by": placed_by}
    return True


def _main_run(areas: dict[int, int], step: int) -> list[int]:
    """The coarse slices of the structure: the axially contiguous run with the most area.

    A structure is one axial run; a stray detection far from it must not stretch
    the searched range. Slices one coarse step apart (or two, bridging one miss)
    belong to the same run.
    """
    found = sorted(z for z, area in areas.items() if area >= MIN_FOREGROUND_PIXELS)
    runs: list[list[int]] = []
    for z in found:
        if runs and z - runs[-1][-1] <= 2 * step:
            runs[-1].append(z)
        else:
            runs.append([z])
    return max(runs, key=lambda run: sum(areas[z] for z in run)) if runs else []


def _agreement(masks: list[np.ndarray]) -> float:
    """Mean pairwise Dice between member masks; empty pairs agree."""
    if len(masks) < 2:
        return 1.0
    scores = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            scores.append(dice(masks[i], masks[j]))
    return float(np.mean(scores))


def _run(engine: Engine, inputs: dict[str, ModelInput], pools: SupportPool, requests: list[_Request], phase: str,
         progress: ProgressCallback | None) -> list[np.ndarray]:
    """Send requests to the runner in groups of equal support size; keep their order."""
    results: list[np.ndarray | None] = [None] * len(requests)
    total = Counter(r.structure for r in requests)
    done: Counter[str] = Counter({name: 0 for name in total})
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault((request.index.size, request.crop), []).append(i)
    for (_, crop), members in groups.items():
        queries = np.stack([inputs[requests[i].structure].images[requests[i].z] for i in members])
        index = np.stack([requests[i].index for i in members])
        finished = 0

        def report(n: int, members: list[int] = members) -> None:
            nonlocal finished
            done.update(requests[i].structure for i in members[finished:finished + n])
            finished += n
            if progress:
                progress(phase, dict(done), dict(total))

        pool = pools.crop_array if crop else pools.array
        for i, probability in zip(members, engine.predict(queries, pool, index, report), strict=True):
            results[i] = probability
    return results  # type: ignore[return-value]
