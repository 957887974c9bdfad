"""What the passes give for one structure: its probabilities on the model grid, and how they were obtained.

Its own module because the plan fills it, the fusion rewrites its probability, and the pipeline reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autocontour.preprocess import ModelInput
from autocontour.support.localise import Localisation
from autocontour.support.prior import StructurePrior


@dataclass
class StructurePrediction:
    """Probabilities on the model grid, and how they were obtained."""

    probability: np.ndarray  # (Z, H, W) mean over ensemble members; 0 where not computed
    agreement: np.ndarray  # (Z,) mean pairwise Dice of members' masks; 1 where all agree or K = 1
    computed: np.ndarray  # (Z,) bool: slices the fine pass segmented
    extent: tuple[int, int] | None  # first and last slice where the coarse pass found the structure
    support_size: int
    ensemble: int
    queries: int = 0
    pairs: int = 0
    window_mm: tuple[float, float] | None = None  # the z range searched, from the bone profiles
    localisation: Localisation | None = None
    searched_mm: tuple[float, float] | None = None  # z of the first and last slice searched
    cases_used: dict[str, int] = field(default_factory=dict)  # source case -> support slices drawn from it
    prior: StructurePrior | None = None  # the registration prior, when the set's source cases gave one
    prior_weight: float | None = None  # the prior's weight in the fusion
    view: ModelInput | None = None  # the grid `probability` lies on: the crop, or None for the whole-body view
    crop: dict | None = None  # the crop's side and centre and what placed it (for the summary)
    planes: dict[str, int] = field(default_factory=dict)  # plane -> cuts segmented (axial: slices)
    warnings: list[str] = field(default_factory=list)

    @property
    def not_in_scan(self) -> bool:
        return self.localisation is not None and self.localisation.verdict == "not_in_scan"

    @property
    def not_localised(self) -> bool:
        """The scan was too short to place and nothing was searched (`axial_search="all"` searches it)."""
        return self.localisation is not None and self.localisation.verdict == "too_short" and not self.computed.any()

