"""Every per-run option of a segmentation, declared once.

The CLI builds a `SegmentOptions` from its flags, the server from its upload form (and stores it with the
job, which its worker validates back); the Python API takes one or a plain mapping. It travels whole through
`Segmenter.segment` into the engine, so a new option is added here and nowhere else. Options whose default
depends on the device (support size, ensemble) or on the settings (threshold) stay None until the Segmenter
resolves them into a `ResolvedOptions`, a copy: the caller's object is never changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autocontour.catalogue import DEFAULT_STRUCTURES
from autocontour.errors import OptionError

# The network's answer is kept only this close to the registration prior's likely region (chosen on
# bench/cross_patient.py with the fusion weights of autocontour.engine.plan).
PRIOR_GATE_MM = 40.0
# What summary.json reports under "options": how the structures were searched and drawn (not what was written).
REPORTED = ("support_size", "ensemble", "axial_search", "coarse_step_mm", "coarse_support_size",
            "support_selection", "registration", "prior_weight", "prior_gate_mm", "crops", "planes", "seed",
            "threshold")


class SegmentOptions(BaseModel):
    """What one segmentation is asked to do: which structures, how hard to look, what to write."""

    model_config = ConfigDict(extra="forbid")

    structures: list[str] | None = Field(
        None, description=f"names of structures the loaded support sets provide (`autocontour structures`; "
                          f"default: {','.join(DEFAULT_STRUCTURES)} where loaded, else every loaded set)")
    support_size: int | None = Field(None, ge=1, le=256, description="support slices per ensemble member "
                                                                     "(default: 16 on CPU, 64 on GPU)")
    ensemble: int | None = Field(None, ge=1, le=16, description="support subsets averaged (default: 1 on CPU, "
                                                                "3 on GPU)")
    threshold: float | None = Field(None, gt=0, lt=1, description="probability threshold (default 0.5)")
    axial_search: Literal["coarse", "all"] = Field(
        "coarse", description="coarse: find each structure's extent first (default); all: segment every body "
                              "slice, also of a scan too short to place (under 120 mm)")
    coarse_step_mm: float = Field(9.0, gt=0, le=50, description="distance between the coarse pass's slices")
    coarse_support_size: int = Field(4, ge=1, le=256, description="support slices for the coarse pass (it only "
                                                                  "has to find the structure)")
    support_selection: Literal["level", "spread"] = Field(
        "level", description="level: examples from the query's relative axial level (default); spread: whole "
                             "extent")
    registration: bool = Field(True, description="register the support sets' source cases to the scan and use "
                                                 "their warped masks (the registration prior)")
    prior_weight: float | None = Field(
        None, ge=0, le=1, description="weight of the registration prior fused with the network, 0-1 (default: "
                                      "follows the registration's quality, and the prior alone where the network "
                                      "draws almost nothing, as chosen on bench/cross_patient.py)")
    prior_gate_mm: float | None = Field(PRIOR_GATE_MM, gt=0, description="keep the network's probability only "
                                        "this close to the prior's likely region (None: everywhere)")
    crops: bool = Field(False, description="fine pass on the support sets' structure-centred crops (off by "
                                           "default: the shipped checkpoint, trained on whole-body views, "
                                           "segments worse on them)")
    planes: Literal["axial", "three"] = Field(
        "axial", description="axial: the fine pass on axial slices (default); three: also on coronal and "
                             "sagittal cuts, with examples cut from the support sets' source cases, averaged "
                             "(about twice the network's work; see bench/RESULTS.md)")
    seed: int = Field(0, description="seed of the support subsets' random draws")
    probabilities: bool = Field(False, description="also write <structure>_prob.nii.gz")
    preview: bool = Field(True, description="write preview.png")
    roi_names: Literal["display", "tg263"] = Field(
        "display", description="ROI names in rtstruct.dcm: the catalogue's display names (default) or TG-263 "
                               "names (the display name where a structure has none)")
    series_uid: str | None = Field(None, description="DICOM input holding several CT series: the Series "
                                                     "Instance UID of the one to segment")

    @field_validator("structures", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """"bladder, CTVn" as the CLI and the form send it; the loaded catalogue checks the names."""
        if isinstance(value, str):
            return value.split(",") if value.strip() else None
        return value

    @classmethod
    def checked(cls, options: SegmentOptions | Mapping[str, Any] | None) -> SegmentOptions:
        """The options given, or an OptionError that names the first invalid one."""
        if isinstance(options, SegmentOptions):
            return options
        try:
            return cls.model_validate(dict(options or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise OptionError(f"invalid option: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc

    def resolved(self, structures: list[str], support_size: int, ensemble: int, threshold: float
                 ) -> ResolvedOptions:
        """A copy with the defaults that depend on the device, the settings and the loaded sets filled in."""
        return ResolvedOptions.model_validate(self.model_dump() | {
            "structures": structures, "support_size": self.support_size or support_size,
            "ensemble": self.ensemble or ensemble,
            "threshold": threshold if self.threshold is None else self.threshold})


class ResolvedOptions(SegmentOptions):
    """SegmentOptions with nothing left to a default that depends on where it runs: what the engine runs with
    and the summary reports, so neither has to guess what a None meant."""

    structures: list[str]
    support_size: int = Field(ge=1, le=256)
    ensemble: int = Field(ge=1, le=16)
    threshold: float = Field(gt=0, lt=1)

    def reported(self) -> dict[str, Any]:
        """The options summary.json reports (REPORTED, in that order)."""
        return {name: getattr(self, name) for name in REPORTED}
