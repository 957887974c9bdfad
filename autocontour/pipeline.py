"""`segment()`: the one entry point the CLI, the Python API and the server share.

    from autocontour import segment
    result = segment("ct.nii.gz", "out/", structures=["bladder", "ctvn"])
    result.summary["structures"]["bladder"]["confidence"]

The stages are visible, one module each: io (read, canonical orientation) ->
preprocess (crop, resample, window) -> support (the examples, and the
registration prior from their source cases) -> engine (the network, coarse
and fine passes, fused with the prior) -> postprocess (masks, rules,
confidence) -> export (NIfTI, summary, preview). A `Segmenter` holds what is expensive to
load (network, support sets) so a server loads it once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydantic import ValidationError

from autocontour import __version__
from autocontour.catalogue import DEFAULT_STRUCTURES, Catalogue
from autocontour.config import Settings
from autocontour.dicom import ROI_NAME_STYLES
from autocontour.dicom.series import DicomSeries, is_dicom_input, read_series
from autocontour.engine import Engine, InferenceOptions, predict_structures, resolve_device
from autocontour.engine.options import PRIOR_GATE_MM
from autocontour.engine.plan import ProgressCallback
from autocontour.engine.prediction import StructurePrediction
from autocontour.engine.runner import cpu_has_native_bf16
from autocontour.engine.selection import SupportPool
from autocontour.errors import NoSupportSetError, OptionError, WeightsError
from autocontour.export import PREVIEW, mask_file, probability_file, write_masks, write_summary
from autocontour.io import CanonicalCT, fingerprint, read_ct, validate_ct, write_image
from autocontour.model.weights import load_model, read_card, sha256_of
from autocontour.postprocess import StructureMask, confidence, laterality_warning, postprocess
from autocontour.preprocess import (
    ModelInput,
    PreprocessSpec,
    body_mask,
    grid_to_canonical,
    prepare,
    prepare_crop,
)
from autocontour.rules import OverlapRules, load_rules
from autocontour.support.localise import bone_profile
from autocontour.support.prior import RegistrationCache, registration_priors
from autocontour.support.store import MANIFEST, SupportSet, discover

MIN_BF16_AGREEMENT = 0.99
DRAFT_DISCLAIMER = (
    "Automatic draft contours for review by a qualified clinician. They are not approved for treatment "
    "planning until a clinician has reviewed and, where needed, corrected every slice.")


@dataclass
class SegmentationResult:
    """Masks on the input grid, the summary, and where files were written."""

    masks: dict[str, sitk.Image]
    probabilities: dict[str, sitk.Image]
    summary: dict
    files: dict[str, Path] = field(default_factory=dict)


def no_weights_message(settings: Settings) -> str:
    return (f"no model weights found at {settings.default_weights}. autocontour does not run with random weights. "
            "Get weights one of three ways: the shipped project checkpoint (models/ in the repository), "
            "`autocontour weights download universeg-v1` (official, research use only) then --weights FILE, "
            "or your own from `autocontour train` / `autocontour finetune`.")


def read_input(path: Path, settings: Settings, series_uid: str | None = None) -> tuple[sitk.Image, DicomSeries | None]:
    """A CT from a NIfTI file or a DICOM series (folder or zip; `series_uid` picks one of several), with every
    check and limit of the settings: the one reader of the CLI, the Python API, the server's upload check and
    its workers."""
    limits: dict[str, Any] = {"max_voxels": settings.max_voxels, "max_decoded_bytes": settings.max_decoded_bytes,
              "max_ratio": settings.max_compression_ratio}
    if is_dicom_input(path):
        series = read_series(path, settings.max_dicom_files, settings.max_dicom_bytes, **limits,
                             scratch=settings.scratch_dir, series_uid=series_uid)
        return validate_ct(series.image), series
    return read_ct(path, **limits), None


class Segmenter:
    """A loaded network and support sets, ready to segment many scans."""

    def __init__(self, settings: Settings | None = None, weights: Path | None = None, device: str | None = None,
                 support_dirs: list[Path] | None = None, shipped_support: bool | None = None,
                 precision: str | None = None, engine_options: dict | None = None, load_engine: bool = True,
                 rules: Path | str | None = None):
        """`load_engine=False` keeps only the model card and support sets: for API processes
        that validate and report while separate workers run the network."""
        self.settings = settings or Settings()
        path = Path(weights or self.settings.weights or self.settings.default_weights)
        if not path.is_file():
            raise WeightsError(no_weights_message(self.settings) if weights is None and self.settings.weights is None
                               else f"weights file not found: {path}")
        engine_device = device or self.settings.device
        device_type = resolve_device(engine_device).type if load_engine else "cpu"
        self.default_support_size, self.default_ensemble, default_precision = self.settings.device_defaults(device_type)
        self.supports: dict[str, SupportSet] = discover(self.settings.support_folders(support_dirs, shipped_support))
        self.catalogue = Catalogue.from_definitions({n: s.definition for n, s in self.supports.items()})
        self.rules: OverlapRules = load_rules(rules or self.settings.rules)
        self.precision_note = ""
        # the latest scan's registrations to the sets' source cases: segmenting it again (other structures,
        # other options) does not register again
        self._registrations: RegistrationCache = {}
        if load_engine:
            model, self.card = load_model(path)
            chosen = precision or default_precision
            self.engine: Engine | None = Engine(model, engine_device, "float32" if chosen == "auto" else chosen,
                                                threads=self.settings.threads, compile=self.settings.compile,
                                                **(engine_options or {}))
            if chosen == "auto":
                self._choose_cpu_precision()
            else:
                self.precision_note = f"{chosen}: {'set by the caller' if precision else 'the device default'}"
        else:
            self.card, self.engine = read_card(path, sha256_of(path)), None

    def _choose_cpu_precision(self) -> None:
        """bfloat16 on a CPU with native bf16, if and only if it leaves the masks as float32 draws them.

        Checked at start-up on real support slices (Dice of the masks >= MIN_BF16_AGREEMENT);
        bench/engine.py measures the same on whole scans.
        """
        if not cpu_has_native_bf16():
            self.precision_note = "float32: this CPU has no native bfloat16"
            return
        if not self.supports:
            self.precision_note = "float32: no support set to check bfloat16 against"
            return
        engine = self._require_engine()
        agreement = engine.agreement("bfloat16", SupportPool(self.supports).array)
        if agreement >= MIN_BF16_AGREEMENT:
            engine.precision = "bfloat16"
            self.precision_note = f"bfloat16: masks agree with float32 (Dice {agreement:.4f}) at start-up"
        else:
            self.precision_note = f"float32: bfloat16 changed the masks (Dice {agreement:.4f}) at start-up"

    def _require_engine(self) -> Engine:
        """The network, or a clear error on a Segmenter built with load_engine=False (the API process of
        distributed mode, which describes the model and support sets while workers run the network)."""
        if self.engine is None:
            raise RuntimeError("this Segmenter was built with load_engine=False: it describes the model and "
                               "support sets but runs no network; segment in a worker")
        return self.engine

    def describe_model(self) -> dict:
        precision = self.engine.precision if self.engine else "set by each worker"
        return {**self.card.model_dump(), "device": self.device_name, "precision": precision,
                "precision_note": self.precision_note}

    @property
    def device_name(self) -> str:
        if self.engine is None:
            return "separate workers"
        device = self.engine.device
        if device.type == "cuda":
            import torch

            return f"cuda ({torch.cuda.get_device_name(device)})"
        return "cpu"

    def warm_up(self) -> None:
        """Forward passes at the coarse and fine support sizes (kernel selection on GPU, compilation
        when enabled) before the first request."""
        coarse = InferenceOptions.model_fields["coarse_support_size"].default
        for size in sorted({min(coarse, self.default_support_size), self.default_support_size}):
            self._require_engine().warm_up(size)

    @property
    def default_structures(self) -> list[str]:
        """The cervix defaults that have a set loaded; else every loaded set."""
        return [n for n in DEFAULT_STRUCTURES if n in self.supports] or list(self.supports)

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
        return {s: self.supports[s] for s in structures}

    def segment(self, ct: Path | str | sitk.Image, out_dir: Path | None = None,
                structures: str | list[str] | None = None, support_size: int | None = None,
                ensemble: int | None = None, threshold: float | None = None, axial_search: str = "coarse",
                support_selection: str = "level", registration: bool = True, prior_weight: float | None = None,
                prior_gate_mm: float | None = PRIOR_GATE_MM, crops: bool = False, planes: str = "axial",
                save_probabilities: bool = False, preview: bool = True,
                progress: ProgressCallback | None = None, cancelled: Callable[[], bool] | None = None,
                keep_ct: bool = False, roi_names: str = "display", series_uid: str | None = None,
                ) -> SegmentationResult:
        """Segment one CT volume; see the module docstring. DICOM input: `series_uid` picks one of several
        CT series, `roi_names` ("display" or "tg263") names the RTSTRUCT's ROIs. `registration=False`
        switches the registration prior off; `prior_weight` and `prior_gate_mm` set its fusion
        (autocontour.engine.plan; None for the weight: it follows the registration's quality; None for the gate: the
        network's answer is kept everywhere); `crops` runs the
        fine pass on the sets' structure-centred crops; `planes="three"` adds coronal and sagittal cuts
        (autocontour.engine.planes)."""
        engine = self._require_engine()
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = round(now - clock, 3)
            clock = now

        names = self.catalogue.parse(structures) if structures else self.default_structures
        supports = self.support_for(names)
        threshold, options = self._checked_options(
            threshold, roi_names, support_size=support_size or self.default_support_size,
            ensemble=ensemble or self.default_ensemble, axial_search=axial_search,
            support_selection=support_selection, registration=registration,
            prior_weight=prior_weight, prior_gate_mm=prior_gate_mm,
            crops=crops, planes=planes)

        if isinstance(ct, sitk.Image):
            image, series = validate_ct(ct), None
        else:
            image, series = read_input(Path(ct), self.settings, series_uid)
        canonical = CanonicalCT(image)
        scan_id = fingerprint(canonical.image)
        lap("read")

        inputs = self._model_inputs(canonical, supports)
        lap("preprocess")

        if any(scan != scan_id for scan, _, _ in self._registrations):
            self._registrations.clear()  # only the latest scan's are kept
        priors, prior_notes = (registration_priors(canonical, supports, inputs, scan_id, self._registrations)
                               if options.registration else ({}, []))
        lap("registration")

        def report(phase: str, done: dict[str, int], total: dict[str, int]) -> None:
            if cancelled and cancelled():
                raise CancelledError()
            if progress:
                progress(phase, done, total)

        z_mm = canonical.slice_positions_mm()
        profile = bone_profile(canonical.array, canonical.spacing_zyx, z_mm)
        def crop_view(name: str, centre_mm: tuple[float, float], side_mm: float) -> ModelInput:
            return prepare_crop(canonical, supports[name].manifest.preprocessing, centre_mm, side_mm,
                                inputs[name].body_slices)

        predictions = predict_structures(engine, inputs, supports, options, scan_id, report, profile, priors,
                                         crop_view)
        lap("inference")

        probabilities = {n: grid_to_canonical(predictions[n].probability, predictions[n].view or inputs[n], canonical)
                         for n in names}
        supported = {n: grid_to_canonical(p.prior.probability, p.view or inputs[n], canonical) >= 0.5
                     for n, p in predictions.items() if p.prior is not None}
        definitions = {n: supports[n].definition for n in names}
        masks, rule_changes = postprocess(probabilities, threshold, self.rules,
                                          {n: d.max_components for n, d in definitions.items()}, supported)
        spacing = canonical.image.GetSpacing()
        lateral = [n for n in names if definitions[n].lateral and masks[n].mask.any()]
        body = body_mask(canonical, PreprocessSpec().body_threshold_hu) if lateral else None
        structures_summary = {n: _structure_summary(n, masks[n], predictions[n], supports[n], body, spacing, z_mm,
                                                    threshold, options.axial_search) for n in names}
        lap("postprocess")

        masks_on_input = {n: canonical.to_input_grid(masks[n].mask.astype(np.uint8)) for n in names}
        probability_images = ({n: canonical.to_input_grid(masks[n].probability, sitk.sitkLinear) for n in names}
                              if save_probabilities else {})
        summary = self._summary(image, canonical, scan_id, options, threshold, structures_summary, rule_changes,
                                timings)
        summary["warnings"] += prior_notes
        if series is not None:
            summary["input"]["format"] = "DICOM series"
            summary["warnings"] += series.warnings
        summary["files"] = {"masks": {n: mask_file(n) for n in names},
                            "probabilities": {n: probability_file(n) for n in probability_images}}
        result = SegmentationResult(masks_on_input, probability_images, summary)
        if out_dir is not None:
            result.files = write_masks(Path(out_dir), masks_on_input, probability_images)
            if preview:
                from autocontour.preview import volume_preview

                flagged = {n: [f["slice"] for f in structures_summary[n]["flagged_slices"]] for n in names}
                result.files["preview"] = volume_preview(
                    canonical.array, canonical.spacing_zyx, {n: masks[n].mask for n in names},
                    Path(out_dir) / PREVIEW, z_mm=z_mm, flagged=flagged, title="autocontour", definitions=definitions)
                summary["files"]["preview"] = PREVIEW
            if series is not None:
                result.files |= self._write_dicom(series, masks_on_input, summary, Path(out_dir), roi_names)
            if keep_ct:  # for the review page; not part of the result zip
                result.files["review_ct"] = Path(out_dir) / "review" / "ct.nii.gz"
                write_image(_compact(image), result.files["review_ct"])
        lap("export")
        timings["total"] = round(sum(timings.values()), 3)
        if out_dir is not None:
            result.files["summary"] = write_summary(Path(out_dir), summary)  # once, with the final timings
        return result

    def _checked_options(self, threshold: float | None, roi_names: str, **engine) -> tuple[float, InferenceOptions]:
        """The threshold and the engine's options, or an OptionError that names what is wrong."""
        if roi_names not in ROI_NAME_STYLES:
            raise OptionError(f"roi_names must be one of {', '.join(ROI_NAME_STYLES)}, got {roi_names!r}")
        threshold = self.settings.threshold if threshold is None else threshold
        if not 0 < threshold < 1:
            raise OptionError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        try:
            return threshold, InferenceOptions(**engine)
        except ValidationError as exc:
            raise OptionError(f"invalid option: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from exc

    def _write_dicom(self, series, masks: dict[str, sitk.Image], summary: dict, out_dir: Path,
                     roi_names: str) -> dict[str, Path]:
        """RTSTRUCT and DICOM-SEG that reference the input series (structures with voxels only)."""

        from autocontour.dicom.outputs import RTSTRUCT_FILE, SEG_FILE, write_rtstruct, write_seg

        arrays = {n: sitk.GetArrayFromImage(m) for n, m in masks.items()}
        if not any(a.any() for a in arrays.values()):
            summary["warnings"].append("no structure has any voxel: no RTSTRUCT or DICOM-SEG written")
            return {}
        structures = summary["structures"]
        descriptions = {n: f"draft, confidence {s['confidence']}" for n, s in structures.items()}
        support_sets = {n: s["support_set"] for n, s in structures.items()}
        definitions = {n: self.supports[n].definition for n in arrays}
        files = {"rtstruct": write_rtstruct(series, arrays, out_dir / RTSTRUCT_FILE, descriptions, definitions,
                                            roi_names),
                 "seg": write_seg(series, arrays, out_dir / SEG_FILE, summary["model"], support_sets, definitions)}
        summary["files"] |= {"rtstruct": RTSTRUCT_FILE, "seg": SEG_FILE}
        return files

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

    def _summary(self, image: sitk.Image, canonical: CanonicalCT, scan_id: str, options: InferenceOptions,
                 threshold: float, structures: dict, rule_changes: list[dict], timings: dict) -> dict:
        notices = [self.card.notice] if self.card.notice else []
        warnings = [f"{n}: {w}" for n, s in structures.items() for w in s["warnings"]]
        if canonical.oblique:
            warnings.append("the CT is oblique: it was resampled to an axis-aligned grid for segmentation")
        return {
            "disclaimer": DRAFT_DISCLAIMER,
            "notices": notices,
            "autocontour_version": __version__,
            "input": {
                "fingerprint": scan_id,
                "size": list(image.GetSize()),
                "spacing_mm": [round(s, 6) for s in image.GetSpacing()],
                "origin_mm": [round(o, 6) for o in image.GetOrigin()],
                "direction": [round(d, 6) for d in image.GetDirection()],
                "orientation": canonical.input_orientation,
                "slice_convention": "slice = axial index counted from the most inferior slice; z_mm = patient "
                                    "superior coordinate (DICOM/LPS) of that slice",
            },
            "model": self.describe_model(),
            "options": {**options.model_dump(), "threshold": threshold},
            "overlap_rules": self.rules.describe(list(structures)),
            "rule_changes": rule_changes,
            "structures": structures,
            "timings_s": timings,
            "warnings": warnings,
        }


def _structure_summary(name: str, m: StructureMask, prediction: StructurePrediction, support: SupportSet,
                       body: np.ndarray | None, spacing: tuple[float, ...], z_mm: np.ndarray, threshold: float,
                       axial_search: str) -> dict:
    """One structure's entry in summary.json: status, volume, extent, confidence and flagged slices (with the
    midline check for a lateral structure where `body` is given), and how it was predicted."""
    definition = support.definition
    # model-grid slices are the canonical slices (same z positions), so per-slice arrays carry over
    conf = confidence(m.mask, m.probability, prediction.agreement, prediction.computed, spacing[0] * spacing[1])
    if body is not None and definition.lateral and m.mask.any():
        crossing = laterality_warning(m.mask, body, definition.laterality)
        if crossing:
            prediction.warnings.append(crossing["warning"])
            conf.flagged = sorted(conf.flagged + [{"slice": z, "reason": "crosses the body midline"}
                                                 for z in crossing["slices"]], key=lambda f: f["slice"])
    voxels = int(m.mask.sum())
    zs = np.nonzero(m.mask.any(axis=(1, 2)))[0]
    status, reason = _status(voxels, prediction, float(m.probability.max()), threshold)
    return {
        "display_name": definition.display_name,
        "definition": definition.model_dump(mode="json"),
        "status": status,
        "status_reason": reason,
        "mask_file": mask_file(name),
        "volume_ml": round(voxels * float(np.prod(spacing)) / 1000, 3),
        "voxels": voxels,
        "slice_range": [int(zs.min()), int(zs.max())] if voxels else None,
        "z_range_mm": [round(float(z_mm[zs.min()]), 2), round(float(z_mm[zs.max()]), 2)] if voxels else None,
        "confidence": conf.structure,
        "slice_confidence": {str(z): c for z, c in conf.per_slice.items()},
        "flagged_slices": [{**f, "z_mm": round(float(z_mm[f["slice"]]), 2)} for f in conf.flagged],
        "postprocessing": m.changes,
        "support_set": support.describe(),
        "support_size": prediction.support_size,
        "ensemble": prediction.ensemble,
        "slices_computed": prediction.queries,
        "searched_z_mm": list(prediction.searched_mm) if prediction.searched_mm else None,
        "localisation": _localisation_summary(prediction, axial_search),
        "source_cases_used": prediction.cases_used,
        "registration_prior": (prediction.prior.describe() | {"fusion_weight": prediction.prior_weight}
                               if prediction.prior else None),
        "crop": prediction.crop,
        "planes": prediction.planes,
        "query_support_pairs": prediction.pairs,
        "warnings": prediction.warnings,
    }


def _status(voxels: int, prediction, max_probability: float, threshold: float) -> tuple[str, str | None]:
    """found, or why a structure is empty: not_in_scan, not_localised, not_found_in_searched_range,
    below_threshold."""
    if voxels:
        return "found", None
    if prediction.not_in_scan:
        return "not_in_scan", prediction.localisation.reason
    if prediction.not_localised:
        return "not_localised", prediction.localisation.reason
    searched = (f"z {prediction.searched_mm[0]:g} to {prediction.searched_mm[1]:g} mm" if prediction.searched_mm
                else "no body slice")
    if not prediction.computed.any():
        return "not_found_in_searched_range", f"the coarse search of {searched} found no slice showing it"
    return "below_threshold", (f"{int(prediction.computed.sum())} slices of {searched} segmented; the highest "
                               f"probability {max_probability:.2f} stays below the threshold {threshold:g} "
                               "(or the clean-up removed what was above it)")


def _localisation_summary(prediction, axial_search: str) -> dict | None:
    located = prediction.localisation
    if located is None:
        return None
    return {"verdict": located.verdict, "reason": located.reason, "applied": axial_search != "all",
            "match_score": None if located.score is None else round(located.score, 3),
            "expected_z_mm": [round(v, 1) for v in located.expected_mm] if located.expected_mm else None,
            "window_z_mm": list(prediction.window_mm) if prediction.window_mm else None}


def _compact(image: sitk.Image) -> sitk.Image:
    """int16 when the HU values are whole numbers in range (CTs are), else as is."""
    values = sitk.GetArrayViewFromImage(image)
    if values.min() >= -32768 and values.max() <= 32767 and np.array_equal(values, np.round(values)):
        return sitk.Cast(image, sitk.sitkInt16)
    return image


class CancelledError(Exception):
    """Raised inside a segmentation when its caller cancelled it."""


def segment(ct: Path | str | sitk.Image, out_dir: Path | str | None = None, structures: str | list[str] | None = None,
            weights: Path | None = None, device: str | None = None, support_dirs: list[Path] | None = None,
            shipped_support: bool | None = None, **options) -> SegmentationResult:
    """Segment one CT with a freshly loaded `Segmenter` (see `Segmenter.segment` for options)."""
    segmenter = Segmenter(weights=weights, device=device, support_dirs=support_dirs, shipped_support=shipped_support)
    return segmenter.segment(ct, Path(out_dir) if out_dir else None, structures, **options)
