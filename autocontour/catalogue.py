"""The structures autocontour segments: an open catalogue, declared by the support sets.

An in-context segmenter segments whatever its examples show, so the
catalogue is data, not code: every support set's manifest declares the
structure it segments (a `StructureDefinition`). The five cervix structures
of the source document keep built-in definitions, used by support sets that
declare none (format-1 sets) and as the defaults a new set of the same name
starts from. `Catalogue` is the set of definitions a loaded server or CLI
actually provides: what `autocontour structures`, `GET /v1/structures`, the
review page, the summary, RTSTRUCT and DICOM-SEG show.

The overlap rules between structures live in `autocontour.rules`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from autocontour.errors import UnknownStructureError

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
Laterality = Literal["left", "right", "midline", "bilateral"]
# DICOM RT ROI Interpreted Type (PS3.3 C.8.8.8), the defined terms a planning system sorts by
InterpretedType = Literal["EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "BOLUS", "AVOIDANCE",
                          "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY",
                          "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD",
                          "SUPPORT", "FIXATION", "DOSE_REGION", "CONTROL"]


class StructureDefinition(BaseModel):
    """One contour a clinician draws, as the product presents and post-processes it."""

    name: str = Field(pattern=NAME_PATTERN, description="identifier: lowercase letters, digits and _")
    display_name: str = Field(min_length=1, max_length=64)
    colour: tuple[int, int, int] = Field(description="RGB, 0-255: previews, review page, RTSTRUCT, DICOM-SEG")
    interpreted_type: InterpretedType = "ORGAN"
    tg263_name: str | None = Field(None, max_length=16, description="AAPM TG-263 standard name, where one exists")
    laterality: Laterality = "midline"
    description: str = ""
    max_components: int = Field(1, ge=1, le=64, description="connected pieces kept by the clean-up")
    nsd_tolerance_mm: float = Field(2.0, gt=0, le=50, description="default surface-Dice tolerance")

    @property
    def lateral(self) -> bool:
        """A one-sided structure: never mirrored, and warned about when it crosses the midline."""
        return self.laterality in ("left", "right")


def _builtin(name: str, display: str, colour: tuple[int, int, int], kind: InterpretedType, tg263: str | None,
             laterality: Laterality, description: str, components: int, tolerance: float) -> StructureDefinition:
    return StructureDefinition(name=name, display_name=display, colour=colour, interpreted_type=kind,
                               tg263_name=tg263, laterality=laterality, description=description,
                               max_components=components, nsd_tolerance_mm=tolerance)


BUILTIN: dict[str, StructureDefinition] = {
    s.name: s
    for s in (
        _builtin("bladder", "Bladder", (255, 215, 0), "ORGAN", "Bladder", "midline",
                 "Urinary bladder, outer wall.", 1, 2.0),
        _builtin("anorectum", "Anorectum", (160, 82, 45), "ORGAN", "Anorectum", "midline",
                 "Anal canal and rectum up to the rectosigmoid junction.", 1, 2.0),
        _builtin("ctvn", "CTVn", (0, 200, 255), "CTV", "CTVn", "bilateral",
                 "Nodal CTV: nodal tumour and the pelvic, common iliac and para-aortic node regions "
                 "(margin around the pelvic vessels).", 2, 3.0),
        _builtin("ctvp", "CTVp", (255, 40, 40), "CTV", "CTVp", "midline",
                 "Primary CTV: cervix, primary tumour, uterus and upper vagina.", 1, 3.0),
        _builtin("parametrium", "Parametrium", (200, 80, 255), "CTV", None, "bilateral",
                 "Parametrial tissue lateral to the cervix and uterus.", 2, 3.0),
    )
}

DEFAULT_STRUCTURES = ("bladder", "anorectum", "ctvn")

# colours for structures whose set declares none: distinct, readable on a grey CT
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40)]


def default_definition(name: str, **fields) -> StructureDefinition:
    """The definition a new support set of this name starts from: the built-in one, or a plain organ."""
    if name in BUILTIN:
        return BUILTIN[name].model_copy(update={k: v for k, v in fields.items() if v is not None})
    laterality = fields.get("laterality") or ("left" if name.endswith("_left") else
                                              "right" if name.endswith("_right") else "midline")
    base: dict[str, Any] = {"name": name, "display_name": name.replace("_", " ").capitalize(),
            "colour": PALETTE[sum(name.encode()) % len(PALETTE)], "laterality": laterality}
    return StructureDefinition(**(base | {k: v for k, v in fields.items() if v is not None}))


class Catalogue:
    """The structures a loaded configuration provides, by name, in a stable order (built-ins first)."""

    def __init__(self, definitions: Iterable[StructureDefinition], available: Iterable[str] = ()):
        self._definitions = {d.name: d for d in definitions}
        self.available = [n for n in self._definitions if n in set(available)]

    @classmethod
    def from_definitions(cls, provided: Mapping[str, StructureDefinition]) -> Catalogue:
        """Built-ins (listed even without a set, so a user sees what could be added) then the sets' own."""
        merged = dict(BUILTIN) | dict(provided)
        order = [n for n in BUILTIN] + sorted(n for n in provided if n not in BUILTIN)
        return cls([merged[n] for n in order], provided.keys())

    def __getitem__(self, name: str) -> StructureDefinition:
        return self._definitions[name]

    def __contains__(self, name: object) -> bool:
        return name in self._definitions

    def __iter__(self):
        return iter(self._definitions.values())

    def get(self, name: str) -> StructureDefinition | None:
        return self._definitions.get(name)

    def parse(self, names: str | list[str] | tuple[str, ...]) -> list[str]:
        """Normalise a user's structure list ("Bladder, CTVn"); names must exist in the catalogue."""
        return parse_structures(names, self)


def parse_structures(names: str | list[str] | tuple[str, ...], catalogue: Catalogue | None = None) -> list[str]:
    """Normalise a user's structure list ("Bladder, CTVn") and reject malformed or unknown names.

    Without a catalogue any well-formed name passes (the caller checks it against the loaded sets).
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    known = ", ".join(catalogue.available) if catalogue else ""
    result: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if catalogue is not None and name not in catalogue:
            raise UnknownStructureError(
                f"unknown structure {raw.strip()!r}{_did_you_mean(name, catalogue.available)}: no loaded support "
                f"set provides it (loaded: {known or 'none'}); add one with `autocontour support build {name} "
                "--case CT MASK --out DIR` and --support-dir DIR")
        if catalogue is None and not _valid_name(name):
            raise UnknownStructureError(f"invalid structure name {raw.strip()!r}: use lowercase letters, digits and _")
        if name not in result:
            result.append(name)
    if not result:
        raise UnknownStructureError("no structure given" + (f"; loaded: {known}" if catalogue else ""))
    return result


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'bladder'?)' for a name close to a loaded one: a spelling slip, or a longer or shorter
    form of the same name (urinary_bladder, kidney_l)."""
    candidates = list(known)
    close = ([k for k in candidates if min(len(k), len(name)) >= 4 and (k in name or name in k)]
             or difflib.get_close_matches(name, candidates, n=1))
    return f" (did you mean {close[0]!r}?)" if close else ""


def _valid_name(name: str) -> bool:
    import re

    return re.fullmatch(NAME_PATTERN, name) is not None
