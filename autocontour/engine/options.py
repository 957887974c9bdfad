"""How hard the engine looks: the options of the passes (`autocontour.engine.plan`).

Its own module because the plan, the selection and the fusion all read it; defaults per device come from
`autocontour.config`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

# The default gate: the network's probability counts only this close to the prior's likely region. Measured
# with bench/cross_patient.py --choose-fusion on the real pair, the phantoms and the virtual patients
# (bench/RESULTS.md, "Choosing the fusion").
PRIOR_GATE_MM: float | None = 40.0


class InferenceOptions(BaseModel):
    """How hard to look. Defaults per device come from `autocontour.config`."""

    support_size: int = Field(16, ge=1, le=256, description="support slices per ensemble member (S)")
    ensemble: int = Field(1, ge=1, le=16, description="support subsets averaged per slice (K)")
    axial_search: str = Field("coarse", pattern="^(coarse|all)$",
                              description="coarse: find the structure's extent first; all: every body slice")
    coarse_step_mm: float = Field(9.0, gt=0, le=50)
    coarse_support_size: int = Field(4, ge=1, le=256, description="support slices for the coarse pass "
                                                                  "(it only has to find the structure)")
    support_selection: str = Field("level", pattern="^(level|spread)$",
                                   description="level: examples from the query's relative level; "
                                               "spread: from the whole extent")
    registration: bool = Field(True, description="register the support sets' source cases to the scan and "
                                                 "use their warped masks (the registration prior)")
    prior_weight: float | None = Field(None, ge=0, le=1,
                                       description="weight of the registration prior in the fused probability "
                                                   "(None: from the registration's quality, `prior_weight_for`, "
                                                   "and 1 where the network is silent, `network_silent`)")
    prior_gate_mm: float | None = Field(PRIOR_GATE_MM, gt=0, description="keep the network's probability only this "
                                        "close to the prior's likely region (None: everywhere)")
    crops: bool = Field(False, description="fine pass on the sets' structure-centred crops (format 2); off by "
                                           "default: the shipped checkpoint segments worse on them "
                                           "(bench/RESULTS.md)")
    planes: str = Field("axial", pattern="^(axial|three)$",
                        description="axial: the fine pass on axial slices; three: also on coronal and sagittal "
                                    "cuts from the sets' atlas copies, averaged (autocontour.engine.planes)")
    seed: int = 0

