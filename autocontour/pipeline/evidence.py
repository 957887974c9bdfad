"""What the structure confidence cannot see: how much evidence placed the structure where it is.

The network's confidence (certainty x agreement) measures how crisp and consistent its probability map is.
A crisp map can be crisply wrong: a bladder drawn in the liver of an upper-abdomen scan that no skeleton match
placed, or a kidney the registration prior drew alone, scored 0.72 and 0.85. Each weak kind of evidence
below multiplies the confidence by its factor, and the summary names each reason, so a value below 0.5 says
"this draft rests on little" whatever the map looks like. The factors were set so that each such case falls
below the values of structures placed on full evidence; how well the result ranks the true Dice is measured
in bench/RESULTS.md ("Confidence against quality").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autocontour.engine.prediction import StructurePrediction
from autocontour.support.store import SupportSet

UNPLACED = 0.6  # no skeleton match placed the structure along z: every body slice was searched
PRIOR_ALONE = 0.6  # the network drew (almost) nothing: the registration prior was drawn alone
NO_PRIOR = 0.8  # the set has atlas copies but no registration prior confirmed the network
BEYOND_SOURCES = 0.5  # the share of the structure beyond the sources' field of view is discounted by this much


@dataclass(frozen=True)
class Discount:
    reason: str
    factor: float


def discounts(prediction: StructurePrediction, mask: np.ndarray, support: SupportSet, axial_search: str,
              scan_fingerprint: str) -> list[Discount]:
    """The weak kinds of evidence behind one drawn structure (`mask`: canonical, as the prediction's slices).
    A set whose only atlas copy is this very scan had nothing to register: no prior is no evidence against."""
    found: list[Discount] = []
    verdict = prediction.localisation.verdict if prediction.localisation else None
    if axial_search == "all" or verdict in ("whole_body", "too_short"):
        found.append(Discount("no skeleton match placed it along z: every body slice was searched", UNPLACED))
    others = [c for c in support.manifest.source_cases if c.atlas is not None and c.fingerprint != scan_fingerprint]
    if prediction.prior is None and others:
        found.append(Discount("no registration prior confirmed the network", NO_PRIOR))
    if prediction.prior is not None and prediction.prior_weight == 1.0:
        found.append(Discount("drawn from the registration prior alone", PRIOR_ALONE))
    if prediction.prior is not None and mask.any():
        beyond = prediction.prior.uninformed()
        share = float(mask[beyond].sum()) / float(mask.sum()) if beyond.any() else 0.0
        if share > 0:
            found.append(Discount(f"{share:.0%} of it lies beyond the source cases' field of view",
                                  1.0 - BEYOND_SOURCES * share))
    return found


def discounted(confidence: float | None, found: list[Discount]) -> float | None:
    if confidence is None:
        return None
    return round(confidence * float(np.prod([d.factor for d in found])), 4)
