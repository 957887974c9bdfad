"""Overlap rules as data: which structures may share voxels.

A rules file (JSON) names *exclusive groups*, whose members must not overlap
one another, and *allowed pairs*, exceptions inside those groups:

    {"name": "cervix",
     "exclusive_groups": [["bladder", "anorectum", "ctvn", "ctvp"]],
     "allowed_pairs": [["bladder", "ctvn"]]}

The shipped file holds the source document's cervix rules (the parametrium is
in no group: it may overlap anything). A clinic can extend them (a file with
`"extends": "cervix"` adds its groups and pairs to the shipped ones) or
replace them (a file without `extends`), with `--rules FILE` or
`AUTOCONTOUR_RULES`. Structures no rule names are not constrained. A voxel
claimed by two structures that may not share it goes to the more probable
one (autocontour.postprocess); the summary reports the rules that ran.
"""

from __future__ import annotations

import json
from functools import cache
from itertools import combinations
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from autocontour.catalogue import NAME_PATTERN
from autocontour.errors import OptionError

SHIPPED = {"cervix": Path(__file__).resolve().parent / "data" / "overlap_rules_cervix.json"}
DEFAULT = "cervix"


class OverlapRules(BaseModel):
    """Exclusive groups and the pairs allowed to overlap inside them."""

    name: str = "custom"
    description: str = ""
    extends: str | None = Field(None, description="a shipped rule set this file adds to")
    exclusive_groups: list[list[str]] = Field(default_factory=list)
    allowed_pairs: list[tuple[str, str]] = Field(default_factory=list)

    @field_validator("exclusive_groups", "allowed_pairs")
    @classmethod
    def _names(cls, groups):
        import re

        for group in groups:
            for name in group:
                if not re.fullmatch(NAME_PATTERN, name):
                    raise ValueError(f"invalid structure name {name!r}")
        return groups

    def conflicts(self, a: str, b: str) -> bool:
        """True when a and b must not share voxels."""
        if a == b or frozenset((a, b)) in {frozenset(p) for p in self.allowed_pairs}:
            return False
        return any(a in group and b in group for group in self.exclusive_groups)

    def exclusive_pairs(self, names: list[str]) -> list[tuple[str, str]]:
        return [(a, b) for a, b in combinations(names, 2) if self.conflicts(a, b)]

    def describe(self, names: list[str]) -> dict:
        """What the summary reports: the rule set and the pairs it constrained in this run."""
        return {"name": self.name, "description": self.description,
                "exclusive_groups": self.exclusive_groups,
                "allowed_pairs": sorted(sorted(p) for p in self.allowed_pairs),
                "applied_pairs": [list(p) for p in self.exclusive_pairs(names)]}


def _read(path: Path) -> OverlapRules:
    try:
        return OverlapRules.model_validate(json.loads(Path(path).read_text()))
    except FileNotFoundError as exc:
        raise OptionError(f"rules file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise OptionError(f"rules file {path} is not JSON: {exc.msg} (line {exc.lineno})") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        raise OptionError(f"rules file {path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc


@cache
def shipped(name: str = DEFAULT) -> OverlapRules:
    return _read(SHIPPED[name])


def load_rules(path: Path | str | None = None) -> OverlapRules:
    """The shipped cervix rules, or a clinic's file (extending a shipped set, or replacing it)."""
    if path is None:
        return shipped()
    rules = _read(Path(path))
    if rules.extends is None:
        return rules
    if rules.extends not in SHIPPED:
        raise OptionError(f"rules file {path}: extends {rules.extends!r}; shipped rule sets: {', '.join(SHIPPED)}")
    base = shipped(rules.extends)
    return OverlapRules(name=f"{base.name}+{rules.name}", description=rules.description or base.description,
                        extends=rules.extends, exclusive_groups=base.exclusive_groups + rules.exclusive_groups,
                        allowed_pairs=base.allowed_pairs + rules.allowed_pairs)
