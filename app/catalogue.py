"""The structures autocontour knows, and the clinical rules between them.

From the source document: CTVn, CTVp and the anorectum never overlap one
another; the parametrium may overlap anything; the bladder may overlap CTVn
(and, by implication, nothing else). The rule table below is the single place
those facts live: postprocessing, the API and the docs all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from app.errors import UnknownStructureError


@dataclass(frozen=True)
class Structure:
    """One contour a clinician draws, as the product presents it."""

    name: str
    display_name: str
    colour: tuple[int, int, int]
    kind: str  # DICOM RT ROI Interpreted Type: ORGAN (organ at risk) or CTV
    description: str
    max_components: int  # connected pieces kept by the clean-up
    nsd_tolerance_mm: float  # default surface-Dice tolerance when evaluating


STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in (
        Structure("bladder", "Bladder", (255, 215, 0), "ORGAN",
                  "Urinary bladder, outer wall.", 1, 2.0),
        Structure("anorectum", "Anorectum", (160, 82, 45), "ORGAN",
                  "Anal canal and rectum up to the rectosigmoid junction.", 1, 2.0),
        Structure("ctvn", "CTVn", (0, 200, 255), "CTV",
                  "Nodal CTV: nodal tumour and the pelvic, common iliac and para-aortic node regions "
                  "(margin around the pelvic vessels).", 2, 3.0),
        Structure("ctvp", "CTVp", (255, 40, 40), "CTV",
                  "Primary CTV: cervix, primary tumour, uterus and upper vagina.", 1, 3.0),
        Structure("parametrium", "Parametrium", (200, 80, 255), "CTV",
                  "Parametrial tissue lateral to the cervix and uterus.", 2, 3.0),
    )
}

# Pairs that may share voxels. Everything else must not overlap.
ALLOWED_OVERLAPS: frozenset[frozenset[str]] = frozenset(
    {frozenset({"bladder", "ctvn"})}
    | {frozenset({"parametrium", other}) for other in STRUCTURES if other != "parametrium"}
)

EXCLUSIVE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (a, b) for a, b in combinations(STRUCTURES, 2) if frozenset({a, b}) not in ALLOWED_OVERLAPS
)

DEFAULT_STRUCTURES = ("bladder", "anorectum", "ctvn")


def parse_structures(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Normalise a user's structure list ("Bladder, CTVn") and reject unknown names."""
    items = names.split(",") if isinstance(names, str) else list(names)
    result: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in STRUCTURES:
            raise UnknownStructureError(f"unknown structure {raw.strip()!r}; known: {', '.join(STRUCTURES)}")
        if name not in result:
            result.append(name)
    if not result:
        raise UnknownStructureError("no structure given; known: " + ", ".join(STRUCTURES))
    return result


def conflicts(a: str, b: str) -> bool:
    return a != b and frozenset({a, b}) not in ALLOWED_OVERLAPS
