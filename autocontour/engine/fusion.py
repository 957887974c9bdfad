"""The network's probability fused with the registration prior's.

p = (1 - w) * p_network * gate + w * p_prior, where the gate keeps the network's answer only within
`prior_gate_mm` of the prior's likely region, and w follows the registration's quality (its final Mattes
mutual information, `prior_weight_for`): a source that aligned well is trusted more than the network, one
that aligned poorly less. Where the network draws almost nothing where the prior places the structure
(`network_silent`), the prior is drawn alone (weight 1) and nothing beyond the sources' field of view.
The prior also gives the fine pass its search window (`prior_window`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

from autocontour.engine.prediction import StructurePrediction
from autocontour.options import SegmentOptions
from autocontour.preprocess import ModelInput
from autocontour.support.localise import Localisation
from autocontour.support.prior import StructurePrior

PRIOR_MARGIN_MM = 15.0  # searched beyond the prior's slices: registration errs by about a vertebra
# The fusion weight follows the registration's final Mattes mutual information (more negative: better aligned):
# PRIOR_WEIGHT_POOR at METRIC_POOR and above, PRIOR_WEIGHT_GOOD at METRIC_GOOD and below, linear between. On
# bench/cross_patient.py the real pair and the phantoms register at -0.13 to -0.20 (their priors score 0.30-0.37)
# and the virtual patients at -0.45 to -0.59 (0.79-0.89); the ramp spans that gap. The two weights are the best
# of --choose-fusion on all three kinds of case (bench/RESULTS.md, "Choosing the fusion"). At 0.4 the network
# still draws alone where it is sure (p_network >= 0.83) and the prior needs the network's help; at 0.9 the
# prior draws wherever it reaches 0.56 and the network moves its edges.
METRIC_POOR, METRIC_GOOD = -0.25, -0.40
PRIOR_WEIGHT_POOR, PRIOR_WEIGHT_GOOD = 0.4, 0.9
# Below this share of the prior's likely volume (prior >= 0.5), the network counts as silent and the prior is
# drawn alone (`network_silent`). Only the network's voxels inside the prior's likely region count ("prior"), not
# all inside the gate ("gate"): a network that draws its own pieces beside the structure is silent on it. Both
# are the best of --choose-fusion (bench/RESULTS.md, "Choosing the silent-network rule": mean Dice 0.687, against
# 0.680 for a share of 0.5 counted inside the gate).
NETWORK_SILENT_SHARE = 0.3
SilentWithin = Literal["gate", "prior"]
NETWORK_SILENT_WITHIN: SilentWithin = "prior"


def prior_window(prior: StructurePrior, z_mm: np.ndarray, bones: Localisation) -> Localisation:
    """The search window from the registration prior (and the slices beyond the sources' fields of view
    where the structure runs on), checked against the bone profile's verdict."""
    present = z_mm[prior.slices_present() | prior.uninformed()]
    if present.size == 0:
        registered = "the registered source case(s) place the structure beyond the scan's ends"
        reason = f"{bones.reason}; {registered} too" if bones.verdict == "not_in_scan" else registered
        return Localisation("not_in_scan", reason, expected_mm=bones.expected_mm, score=bones.score)
    window = (float(present[0]) - PRIOR_MARGIN_MM, float(present[-1]) + PRIOR_MARGIN_MM)
    reason = "registration prior"
    if bones.verdict == "window" and bones.window_mm is not None and (
            bones.window_mm[1] < window[0] or bones.window_mm[0] > window[1]):
        reason += (f"; the bone profile expected z {bones.window_mm[0]:.0f} to {bones.window_mm[1]:.0f} mm, "
                   "which does not overlap: check the result")
    return Localisation("window", reason, window, bones.expected_mm, bones.score)


def prior_weight_for(metric: float, poor: float = PRIOR_WEIGHT_POOR, good: float = PRIOR_WEIGHT_GOOD) -> float:
    """The prior's fusion weight for a registration that ended at this Mattes mutual information: `poor` at
    METRIC_POOR and above, `good` at METRIC_GOOD and below (the bench tries other pairs)."""
    share = float(np.clip((METRIC_POOR - metric) / (METRIC_POOR - METRIC_GOOD), 0.0, 1.0))
    return round(poor + share * (good - poor), 3)


def gate(prior: np.ndarray, gate_mm: float | None, spacing_zyx: tuple[float, float, float]) -> np.ndarray | None:
    """Where the network's probability counts: within `gate_mm` of where the prior reaches 0.5 (None: everywhere;
    nowhere when the prior never reaches 0.5)."""
    if gate_mm is None:
        return None
    likely = prior >= 0.5
    if not likely.any():
        return np.zeros_like(likely)
    return ndimage.distance_transform_edt(~likely, sampling=spacing_zyx) <= gate_mm


def fuse(network: np.ndarray, prior: np.ndarray, weight: float, near: np.ndarray | None) -> np.ndarray:
    """(1 - weight) * network * near + weight * prior, `near` from `gate` (None: the network everywhere)."""
    if near is not None:
        network = network * near
    return (1 - weight) * network + weight * prior


def network_silent(network: np.ndarray, prior: np.ndarray, near: np.ndarray | None,
                   share: float = NETWORK_SILENT_SHARE, within: SilentWithin = NETWORK_SILENT_WITHIN) -> bool:
    """Whether the network draws (p >= 0.5) less than `share` of the prior's likely volume (p >= 0.5).

    `within` says which of its voxels count: "prior", those inside the prior's likely region (a network
    that draws its own pieces beside the structure is silent on it); "gate", all inside the gate.
    Never when the prior has no likely region: then there is nothing to draw from it."""
    likely_region = prior >= 0.5
    likely = int(np.count_nonzero(likely_region))
    drawn = network >= 0.5
    if within == "prior":
        drawn &= likely_region
    elif near is not None:
        drawn &= near
    return likely > 0 and int(np.count_nonzero(drawn)) < share * likely


def fuse_prediction(prediction: StructurePrediction, model_input: ModelInput, options: SegmentOptions) -> None:
    """The fused probability on the searched slices; the network alone beyond the sources' fields of view."""
    assert prediction.prior is not None and prediction.prior_weight is not None
    spacing = (model_input.grid.GetSpacing()[2], model_input.pixel_mm, model_input.pixel_mm)
    prior = prediction.prior.probability
    near = gate(prior, options.prior_gate_mm, spacing)
    uninformed = prediction.prior.uninformed()[:, None, None]
    informed = prediction.computed[:, None, None] & ~uninformed
    silent = options.prior_weight is None and network_silent(prediction.probability * informed, prior * informed,
                                                             near)
    if silent:
        prediction.prior_weight = 1.0
        prediction.warnings.append("the network drew almost nothing where the registered source case(s) place the "
                                   "structure: drawn from the registration prior alone, and nothing beyond the "
                                   "source scans' field of view; review every slice")
    fused = fuse(prediction.probability, prior, prediction.prior_weight, near)
    # beyond the sources' field of view only the network knows; one that failed where it could be checked is
    # not trusted there either
    fused = np.where(uninformed, 0.0 if silent else prediction.probability, fused)
    prediction.probability = np.where(prediction.computed[:, None, None], fused, 0.0).astype(np.float32)
