"""`Segmenter.segment`: the one path from a CT to draft contours that the CLI, the Python API and the
server's workers share.

    from autocontour.options import SegmentOptions
    from autocontour.pipeline import Segmenter
    result = Segmenter().segment("ct.nii.gz", "out/", SegmentOptions(structures=["bladder", "ctvn"]))
    result.summary.structures["bladder"].confidence

The stages are visible, one module each: read (autocontour.dicom.reading, canonical orientation) ->
preprocess (crop, resample, window) -> register (the support sets' source cases: the registration prior) ->
infer (autocontour.engine: coarse and fine passes, fused with the prior) -> postprocess (masks, rules) ->
summarise (autocontour.pipeline.summary) -> write (autocontour.pipeline.outputs). A `Segmenter` holds what
is expensive to load (network, support sets) so a server loads it once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from autocontour.config import Settings
from autocontour.dicom.reading import read_input
from autocontour.dicom.series import DicomSeries
from autocontour.engine import predict_structures, resolve_device
from autocontour.engine.plan import ProgressCallback
from autocontour.engine.prediction import StructurePrediction
from autocontour.export import PREVIEW, mask_file, probability_file
from autocontour.io import CanonicalCT, fingerprint, validate_ct
from autocontour.options import ResolvedOptions, SegmentOptions
from autocontour.pipeline.library import Library
from autocontour.pipeline.model import LoadedModel
from autocontour.pipeline.outputs import Drawing, write_outputs, write_summary_json
from autocontour.pipeline.summary import (
    NO_DICOM_OUTPUT,
    ModelSummary,
    OutputFiles,
    Summary,
    input_summary,
    structure_summary,
    summary_warnings,
)
from autocontour.postprocess import StructureMask, postprocess
from autocontour.preprocess import ModelInput, PreprocessSpec, body_mask, grid_to_canonical, prepare, prepare_crop
from autocontour.support.localise import bone_profile
from autocontour.support.prior import RegistrationCache, registration_priors
from autocontour.support.store import SupportSet


class CancelledError(Exception):
    """Raised inside a segmentation when its caller cancelled it."""


@dataclass
class SegmentationResult:
    """Masks on the input grid, the summary, and where files were written."""

    masks: dict[str, sitk.Image]
    probabilities: dict[str, sitk.Image]
    summary: Summary
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class Scan:
    """The CT as read: the input image, its canonical view, its DICOM series (if any) and its fingerprint."""

    canonical: CanonicalCT
    series: DicomSeries | None
    fingerprint: str


@dataclass
class Drawn:
    """The postprocessed masks on the canonical grid, what the rules changed, and the body mask of the midline
    check (computed only where a lateral structure was drawn)."""

    masks: dict[str, StructureMask]
    rule_changes: list[dict]
    body: np.ndarray | None


class Clock:
    """Seconds per stage, in the order they ran: summary.json's timings_s."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 3)
        self._last = now

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(sum(self.timings.values()), 3)}


class Segmenter:
    """A loaded network and support sets, ready to segment many scans."""

    def __init__(self, settings: Settings | None = None, weights: Path | None = None, device: str | None = None,
                 support_dirs: list[Path] | None = None, shipped_support: bool | None = None,
                 precision: str | None = None, engine_options: dict | None = None,
                 rules: Path | str | None = None):
        self.library = Library(settings, weights, support_dirs, shipped_support, rules)
        self.settings = self.library.settings
        engine_device = device or self.settings.device
        self.default_support_size, self.default_ensemble, default_precision = self.settings.device_defaults(
            resolve_device(engine_device).type)
        self.model = LoadedModel(self.library.weights, engine_device, precision or default_precision,
                                 precision is not None, self.settings.threads, self.settings.compile,
                                 self.library.supports, engine_options)
        # the latest scan's registrations to the sets' source cases: segmenting it again (other structures,
        # other options) does not register again
        self._registrations: RegistrationCache = {}
        # held by whoever runs the network: a server's job worker and its edits share one model, and the
        # engine and the registration cache are not made for two threads at once
        self.engine_lock = threading.Lock()

    def describe_model(self) -> dict:
        return self.model.describe()

    def warm_up(self) -> None:
        """Forward passes at the coarse and fine support sizes (kernel selection on GPU, compilation
        when enabled) before the first request."""
        coarse = SegmentOptions.model_fields["coarse_support_size"].default
        for size in sorted({min(coarse, self.default_support_size), self.default_support_size}):
            self.model.engine.warm_up(size)

    def resolve(self, options: SegmentOptions) -> ResolvedOptions:
        """The options with this device's, the settings' and the loaded sets' defaults filled in."""
        return options.resolved(self.library.structures(options.structures), self.default_support_size,
                                self.default_ensemble, self.settings.threshold)

    def segment(self, ct: Path | str | sitk.Image, out_dir: Path | str | None = None,
                options: SegmentOptions | Mapping[str, Any] | None = None, *,
                progress: ProgressCallback | None = None, cancelled: Callable[[], bool] | None = None,
                keep_ct: bool = False) -> SegmentationResult:
        """Segment one CT volume (see the module docstring and `SegmentOptions`). `progress` hears each stage
        by name (with no slice counts) and the network's passes (with them), `cancelled` is asked between
        stages and batches (CancelledError), `keep_ct` also writes the CT for the server's review page."""
        resolved = self.resolve(SegmentOptions.checked(options))
        supports = self.library.support_for(resolved.structures)
        report = _reporter(progress, cancelled)
        clock = Clock()
        report("reading", {}, {})  # a stage without slices to count: named, so no step runs in silence
        scan = self._read(ct, resolved.series_uid)
        clock.lap("read")
        report("preprocessing", {}, {})
        inputs = self._model_inputs(scan.canonical, supports)
        clock.lap("preprocess")
        report("registration", {}, {})
        priors, prior_notes = self._register(scan, supports, inputs, resolved)
        clock.lap("registration")
        predictions = self._infer(scan, supports, inputs, priors, resolved, report)
        clock.lap("inference")
        report("post-processing", {}, {})
        drawn = self._postprocess(scan, supports, inputs, predictions, resolved)
        summary = self._summarise(scan, supports, predictions, drawn, resolved, prior_notes, clock,
                                  out_dir is not None)
        clock.lap("postprocess")
        drawing = self._drawing(scan, supports, drawn, resolved)
        result = SegmentationResult(drawing.masks, drawing.probabilities, summary)
        if out_dir is not None:
            report("writing outputs", {}, {})
            result.files = write_outputs(Path(out_dir), summary, drawing, scan.canonical, scan.series,
                                         resolved.roi_names, keep_ct)
        clock.lap("export")
        result.summary = summary.model_copy(update={"timings_s": clock.total()})
        if out_dir is not None:
            result.files["summary"] = write_summary_json(Path(out_dir), result.summary)
        return result

    def _read(self, ct: Path | str | sitk.Image, series_uid: str | None) -> Scan:
        if isinstance(ct, sitk.Image):
            image, series = validate_ct(ct), None
        else:
            image, series = read_input(Path(ct), self.settings, series_uid)
        canonical = CanonicalCT(image)
        return Scan(canonical, series, fingerprint(canonical.image))

    def _model_inputs(self, canonical: CanonicalCT, supports: dict[str, SupportSet]) -> dict[str, ModelInput]:
        """Prepare the CT once per distinct preprocessing recipe among the support sets."""
        by_spec: dict[str, ModelInput] = {}
        bodies: dict[float, np.ndarray] = {}
        inputs = {}
        for name, support in supports.items():
            spec: PreprocessSpec = support.manifest.preprocessing
            if spec.key() not in by_spec:
                if spec.body_threshold_hu not in bodies:
                    bodies[spec.body_threshold_hu] = body_mask(canonical, spec.body_threshold_hu)
                by_spec[spec.key()] = prepare(canonical, spec, bodies[spec.body_threshold_hu])
            inputs[name] = by_spec[spec.key()]
        return inputs

    def _register(self, scan: Scan, supports: dict[str, SupportSet], inputs: dict[str, ModelInput],
                  options: ResolvedOptions) -> tuple[dict, list[str]]:
        """The registration priors (and notes on them), reusing the latest scan's registrations."""
        if any(scanned != scan.fingerprint for scanned, _, _ in self._registrations):
            self._registrations.clear()  # only the latest scan's are kept
        if not options.registration:
            return {}, []
        return registration_priors(scan.canonical, supports, inputs, scan.fingerprint, self._registrations)

    def _infer(self, scan: Scan, supports: dict[str, SupportSet], inputs: dict[str, ModelInput], priors: dict,
               options: ResolvedOptions, report: ProgressCallback) -> dict[str, StructurePrediction]:
        canonical = scan.canonical
        profile = bone_profile(canonical.array, canonical.spacing_zyx, canonical.slice_positions_mm())

        def crop_view(name: str, centre_mm: tuple[float, float], side_mm: float) -> ModelInput:
            return prepare_crop(canonical, supports[name].manifest.preprocessing, centre_mm, side_mm,
                                inputs[name].body_slices)

        return predict_structures(self.model.engine, inputs, supports, options, scan.fingerprint, report, profile,
                                  priors, crop_view)

    def _postprocess(self, scan: Scan, supports: dict[str, SupportSet], inputs: dict[str, ModelInput],
                     predictions: dict[str, StructurePrediction], options: ResolvedOptions) -> Drawn:
        """Probabilities back on the canonical grid, thresholded and cleaned up under the overlap rules."""
        canonical, names = scan.canonical, options.structures
        probabilities = {n: grid_to_canonical(predictions[n].probability, predictions[n].view or inputs[n], canonical)
                         for n in names}
        supported = {n: grid_to_canonical(p.prior.probability, p.view or inputs[n], canonical) >= 0.5
                     for n, p in predictions.items() if p.prior is not None}
        masks, rule_changes = postprocess(probabilities, options.threshold, self.library.rules,
                                          {n: supports[n].definition.max_components for n in names}, supported)
        lateral = [n for n in names if supports[n].definition.lateral and masks[n].mask.any()]
        body = body_mask(canonical, PreprocessSpec().body_threshold_hu) if lateral else None
        return Drawn(masks, rule_changes, body)

    def _summarise(self, scan: Scan, supports: dict[str, SupportSet], predictions: dict[str, StructurePrediction],
                   drawn: Drawn, options: ResolvedOptions, prior_notes: list[str], clock: Clock,
                   writes: bool) -> Summary:
        canonical, names = scan.canonical, options.structures
        spacing, z_mm = canonical.image.GetSpacing(), canonical.slice_positions_mm()
        structures = {n: structure_summary(n, drawn.masks[n], predictions[n], supports[n], drawn.body, spacing,
                                           z_mm, options.threshold, options.axial_search, scan.fingerprint,
                                           self.library.calibration)
                      for n in names}
        dicom = writes and scan.series is not None
        drawn_any = any(m.mask.any() for m in drawn.masks.values())
        files = OutputFiles(masks={n: mask_file(n) for n in names},
                            probabilities={n: probability_file(n) for n in names} if options.probabilities else {},
                            preview=PREVIEW if writes and options.preview else None,
                            **(_dicom_files() if dicom and drawn_any else {}))
        card = self.model.card
        return Summary(
            notices=[card.notice] if card.notice else [],
            input=input_summary(canonical.input, canonical, scan.fingerprint, scan.series is not None),
            model=ModelSummary.model_validate(self.describe_model()), options=options.reported(),
            overlap_rules=self.library.rules.describe(names), rule_changes=drawn.rule_changes,
            structures=structures, timings_s=clock.timings,
            warnings=summary_warnings(structures, canonical.oblique, prior_notes,
                                      scan.series.warnings if scan.series else [],
                                      [NO_DICOM_OUTPUT] if dicom and not drawn_any else []),
            files=files)

    def _drawing(self, scan: Scan, supports: dict[str, SupportSet], drawn: Drawn,
                 options: ResolvedOptions) -> Drawing:
        canonical, names = scan.canonical, options.structures
        return Drawing(
            masks={n: canonical.to_input_grid(drawn.masks[n].mask.astype(np.uint8)) for n in names},
            probabilities=({n: canonical.to_input_grid(drawn.masks[n].probability, sitk.sitkLinear) for n in names}
                           if options.probabilities else {}),
            canonical_masks={n: drawn.masks[n].mask for n in names},
            definitions={n: supports[n].definition for n in names})


def _dicom_files() -> dict[str, str]:
    """The RTSTRUCT and DICOM-SEG a DICOM input gets (where any structure was drawn)."""
    from autocontour.dicom.outputs import RTSTRUCT_FILE, SEG_FILE  # highdicom: only for DICOM input

    return {"rtstruct": RTSTRUCT_FILE, "seg": SEG_FILE}


def _reporter(progress: ProgressCallback | None, cancelled: Callable[[], bool] | None) -> ProgressCallback:
    """The engine's progress callback: cancellation first (CancelledError), then the caller's progress."""
    def report(phase: str, done: dict[str, int], total: dict[str, int]) -> None:
        if cancelled and cancelled():
            raise CancelledError()
        if progress:
            progress(phase, done, total)

    return report


def segment(ct: Path | str | sitk.Image, out_dir: Path | str | None = None,
            options: SegmentOptions | Mapping[str, Any] | None = None, *, weights: Path | None = None,
            device: str | None = None, support_dirs: list[Path] | None = None,
            shipped_support: bool | None = None) -> SegmentationResult:
    """Segment one CT with a freshly loaded `Segmenter` (see `SegmentOptions` for the options)."""
    segmenter = Segmenter(weights=weights, device=device, support_dirs=support_dirs, shipped_support=shipped_support)
    return segmenter.segment(ct, out_dir, options)
