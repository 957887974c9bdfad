"""What every process that serves segmentations needs, network or not.

An API process of distributed mode validates requests and describes the model while separate workers run
the network: it needs the settings, the support sets with their catalogue, the overlap rules and the model
card, and nothing that loads torch weights onto a device. A `Segmenter` holds one of these beside its network.
"""

from __future__ import annotations

import logging
from pathlib import Path

from autocontour.catalogue import DEFAULT_STRUCTURES, Catalogue
from autocontour.config import Settings
from autocontour.errors import NoSupportSetError, SupportSetError, WeightsError
from autocontour.model.weights import ModelCard, read_card, sha256_of
from autocontour.pipeline.calibration import load_calibration
from autocontour.rules import OverlapRules, load_rules
from autocontour.support.store import MANIFEST, SupportSet, discover, load_support_set

log = logging.getLogger(__name__)
WORKERS = "separate workers"


class Library:
    """Settings, support sets, catalogue, rules and the model card: loaded once, read by every request."""

    def __init__(self, settings: Settings | None = None, weights: Path | None = None,
                 support_dirs: list[Path] | None = None, shipped_support: bool | None = None,
                 rules: Path | str | None = None):
        self.settings = settings or Settings()
        self.weights = weights_path(self.settings, weights)
        self.supports: dict[str, SupportSet] = discover(self.settings.support_folders(support_dirs, shipped_support))
        self._stamps = {name: _manifest_stamp(s) for name, s in self.supports.items()}
        self.catalogue = Catalogue.from_definitions({n: s.definition for n, s in self.supports.items()})
        self.rules: OverlapRules = load_rules(rules or self.settings.rules)
        self.card: ModelCard = read_card(self.weights, sha256_of(self.weights))  # without loading the network
        self.calibration = load_calibration(self.card.sha256, self.settings.confidence_calibration)

    def describe_model(self) -> dict:
        """The model card as an API process without the network shows it: the workers choose the precision."""
        return {**self.card.model_dump(), "device": WORKERS, "precision": "set by each worker",
                "precision_note": ""}

    @property
    def default_structures(self) -> list[str]:
        """The cervix defaults that have a set loaded; else every loaded set."""
        return [n for n in DEFAULT_STRUCTURES if n in self.supports] or list(self.supports)

    def structures(self, requested: list[str] | None) -> list[str]:
        """The structures a request names (the defaults when it names none), each known and with a set."""
        names = self.catalogue.parse(requested) if requested else self.default_structures
        self.support_for(names)
        return names

    def support_for(self, structures: list[str]) -> dict[str, SupportSet]:
        missing = [s for s in structures if s not in self.supports]
        if missing:
            name = missing[0]
            shipped = (self.settings.shipped_support_dir / name / MANIFEST).is_file()
            why = ("the shipped one is switched off (--no-shipped-support)" if shipped else
                   "no loaded support-set folder provides one")
            loaded = ", ".join(self.supports) or "none"
            raise NoSupportSetError(
                f"no support set for {name!r}: {why} (loaded: {loaded}). Build one from your own contoured cases "
                f"with `autocontour support build {name} --case CT MASK_OR_RTSTRUCT [--roi NAME] [--case ...] "
                f"--out DIR` and pass --support-dir DIR (server: AUTOCONTOUR_SUPPORT_DIRS)")
        return {s: self.refresh(s) for s in structures}

    def refresh(self, structure: str) -> SupportSet:
        """The structure's set, read again when its folder holds another set than the one loaded: a set grown
        (`support add`, or an approval on the review page) serves the next job in every process that loaded it
        (the API, each Celery worker), without a restart. A set caught mid-swap, or unreadable, stays as it was."""
        support = self.supports[structure]
        stamp = _manifest_stamp(support)
        if support.path is None or stamp is None or stamp == self._stamps.get(structure):
            return support
        try:
            support = load_support_set(support.path)
        except SupportSetError as exc:
            log.warning("support set of %s not reloaded: %s", structure, exc)
            return support
        self.supports[structure], self._stamps[structure] = support, stamp
        log.info("support set of %s reloaded: %s", structure, support.id)
        return support


def _manifest_stamp(support: SupportSet) -> tuple[int, int] | None:
    """Which manifest file the set's folder holds now (inode, modification time); None if none is there."""
    if support.path is None:
        return None
    try:
        found = (Path(support.path) / MANIFEST).stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


def weights_path(settings: Settings, weights: Path | None) -> Path:
    """The checkpoint to use (the caller's, the settings', else the shipped one), or why there is none."""
    path = Path(weights or settings.weights or settings.default_weights)
    if not path.is_file():
        raise WeightsError(no_weights_message(settings) if weights is None and settings.weights is None
                           else f"weights file not found: {path}")
    return path


def no_weights_message(settings: Settings) -> str:
    return (f"no model weights found at {settings.default_weights}. autocontour does not run with random weights. "
            "Get weights one of three ways: the shipped project checkpoint (models/ in the repository), "
            "`autocontour weights download universeg-v1` (official, research use only) then --weights FILE, "
            "or your own from `autocontour train` / `autocontour finetune`.")
