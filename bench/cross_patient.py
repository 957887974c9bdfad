"""Cross-patient benchmark: support from one patient, query another (issue 13, item 4).

Every later change to the engine is judged on this. For each case a source
patient supplies the examples and a different query patient is segmented:

- real: the two real labelled scans (`pelvis_ct_example`, pelvis and abdomen,
  3 mm, no contrast; `chest_abdomen_ct_example`, neck to L3, 0.7 x 0.7 x 2.5 mm,
  arterial phase), both directions, on the structures both label;
- virtual: the example CT against virtual patients made from it
  (`autocontour.training.virtual`, seeds VIRTUAL_SEEDS: full, pelvis-only and
  abdomen-only fields of view);
- phantom: one phantom (`autocontour.phantom`) as source, another as query;
- dicom: the 20-slice upper-abdomen DICOM example, for pelvic structures that
  are not in the scan and must not be drawn.

Columns: "network" is the product path (`build_support_set` from the source
patient, then `Segmenter.segment(..., axial_search="all")`; the DICOM case
uses the product's default localisation, since what it must show is
`not_in_scan`); "registration" is the atlas prior alone
(`autocontour.support.registration`, thresholded at 0.5 on the query's grid);
"hybrid" is the product's default path: support sets with atlas copies, the
registration prior for the window and the levels, fused with the network
(`autocontour.engine.fusion`). `--choose-fusion` measures every fusion weight and gate
on the main structures (network and prior each through the product path),
then the share below which the network counts as silent (the prior drawn
alone) and the clean-up's rule for pieces the prior places, and prints the
tables the engine's defaults were chosen from. Metrics per structure: Dice, surface
Dice at the structure's tolerance and HD95 (`autocontour.evaluation.metrics`);
structures absent from a query are not averaged but counted as drawn or not.

    python bench/cross_patient.py [--cases real,virtual,phantom,dicom] [--structures a,b] [--support-size 16]
                                  [--columns network,registration,hybrid] [--network-cases K] [--hybrid-cases K]
                                  [--network-structures a,b]
                                  [--choose-fusion [--fusion-inputs FILE] | --fusion-from FILE]
                                  [--prior-weight W] [--crops]
                                  [--weights FILE] [--baseline-weights FILE | --baseline-results JSON]
                                  [--json-out JSON] [--quick] [--threads 1]
                                  [--write-results]

`--baseline-weights` runs the network and hybrid columns a second time with a previous checkpoint, in the same
process and on the same support sets, and adds a summary of each case's mean Dice with the difference;
`--baseline-results` takes those columns from an earlier run's `--json-out` instead (same engine and cases).

The chest-abdomen scan's liver, spleen, kidneys, aorta and stomach are held
back for independent evaluation: this script never reads them (HELD_BACK).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocontour.catalogue import default_definition  # noqa: E402
from autocontour.engine.fusion import (  # noqa: E402
    METRIC_GOOD,
    METRIC_POOR,
    SilentWithin,
    fuse,
    gate,
    network_silent,
    prior_weight_for,
)
from autocontour.evaluation.metrics import compute_metrics, nsd_key  # noqa: E402
from autocontour.options import SegmentOptions  # noqa: E402
from autocontour.overlap import dice  # noqa: E402
from autocontour.phantom import make_phantom  # noqa: E402
from autocontour.support.registration import make_atlas_ct, make_atlas_mask, register, to_grid  # noqa: E402
from autocontour.training.virtual import virtual_patient  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
EXAMPLE = ROOT / "examples" / "pelvis_ct"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Cross-patient benchmark"
HELD_BACK = frozenset({"liver", "spleen", "kidney_left", "kidney_right", "aorta", "stomach"})

# benchmark structure -> the label names that make it (a union), as both real scans spell them
MAIN = {n: (n,) for n in ("colon", "duodenum", "inferior_vena_cava", "portal_vein_and_splenic_vein",
                          "iliopsoas_left", "iliopsoas_right", "autochthon_left", "autochthon_right")}
SMALL = {n: (n,) for n in ("small_bowel", "pancreas", "adrenal_gland_left", "adrenal_gland_right")}
BONES = {f"vertebrae_{v.lower()}": (f"vertebrae_{v}",) for v in ("T12", "L1", "L2", "L3")}
BONES["ribs"] = tuple(f"rib_{side}_{i}" for side in ("left", "right") for i in range(7, 13))
GROUPS = {"main": MAIN, "small organs": SMALL, "bones": BONES}
PELVIC = {n: (n,) for n in ("urinary_bladder", "sacrum", "hip_left", "hip_right", "iliac_artery_left")}
PHANTOM = {n: (n,) for n in ("urinary_bladder", "colon", "sacrum", "hip_left", "hip_right", "iliopsoas_left",
                             "iliopsoas_right")}
QUICK = ("colon", "iliopsoas_left", "vertebrae_l1")
VIRTUAL_SEEDS = {"full": 9101, "pelvis": 9102, "abdomen": 9103}  # held out: training draws seeds < 9000
COLUMNS = ("network", "registration", "hybrid", "hybrid+planes")  # hybrid+planes: the hybrid with planes="three"
BASELINE = " (baseline)"  # the same column with --baseline-weights
# pieces the clean-up keeps, as a clinic would declare them (`support build --components`): bowel loops leave and
# re-enter the field of view and the slab, so a colon is several pieces; everything else one
PIECES = {"colon": 8, "small_bowel": 8}
STRUCTURES_PER_CALL = 4  # segment() keeps every structure's full-grid probability: bound the memory


def group_of(structure: str) -> str:
    for group, members in GROUPS.items():
        if structure in members:
            return group
    return "pelvic" if structure in PELVIC else "phantom"


@dataclass
class Scan:
    """A CT and its label map (both LPS), with label name -> value; written to disk for the product path."""

    name: str
    ct: sitk.Image
    labels: sitk.Image | None
    names: dict[str, int]
    path: Path | None = None  # CT file or DICOM folder the product reads

    def mask(self, structure: str, parts: tuple[str, ...]) -> np.ndarray:
        """The structure as a canonical (z, y, x) bool array: the union of its labels present here."""
        if HELD_BACK & set(parts):
            raise ValueError(f"{structure} uses held-back labels {sorted(HELD_BACK & set(parts))}")
        values = [self.names[p] for p in parts if p in self.names]
        return np.isin(sitk.GetArrayViewFromImage(self.labels), values)


@dataclass
class Case:
    name: str
    source: Scan
    query: Scan
    structures: dict[str, tuple[str, ...]]
    axial_search: str = "all"
    results: dict = field(default_factory=dict)  # column -> structure -> metrics
    seconds: dict = field(default_factory=dict)  # column -> wall seconds
    notes: list[str] = field(default_factory=list)
    built: list[str] | None = None  # structures with a support set from the source patient


def read_scan(name: str, folder: Path) -> Scan:
    ct = sitk.DICOMOrient(sitk.ReadImage(str(folder / "ct.nii.gz")), "LPS")
    labels = sitk.DICOMOrient(sitk.ReadImage(str(folder / "labels.nii.gz")), "LPS")
    names = {str(v): int(k) for k, v in json.loads((folder / "labels.json").read_text()).items()}
    names = {n: v for n, v in names.items() if n not in HELD_BACK}
    return Scan(name, ct, labels, names, folder / "ct.nii.gz")


def in_both(structures: dict, a: Scan, b: Scan) -> dict:
    return {s: parts for s, parts in structures.items()
            if any(p in a.names for p in parts) and any(p in b.names for p in parts)}


def build_cases(kinds: list[str], structures: dict, work: Path, quick: bool) -> list[Case]:
    cases: list[Case] = []
    example = read_scan("example CT", EXAMPLE)
    if "real" in kinds:
        pelvis = read_scan("pelvis", DATA / "pelvis_ct_example")
        chest = read_scan("chest-abdomen", DATA / "chest_abdomen_ct_example")
        shared = in_both(structures, pelvis, chest)
        cases += [Case("real: pelvis -> chest-abdomen", pelvis, chest, shared),
                  Case("real: chest-abdomen -> pelvis", chest, pelvis, shared)]
    if "virtual" in kinds:
        for fov, seed in VIRTUAL_SEEDS.items():
            patient = virtual_patient(example.ct, example.labels, example.names, seed, fov=fov)
            path = work / f"virtual_{seed}" / "ct.nii.gz"
            path.parent.mkdir(parents=True)
            sitk.WriteImage(patient.ct, str(path), useCompression=True)
            query = Scan(f"virtual {seed} ({fov})", patient.ct, patient.labels, example.names, path)
            present = {s: p for s, p in structures.items() if any(x in example.names for x in p)}
            case = Case(f"virtual: example -> {fov} (seed {seed})", example, query, present)
            case.notes.append(json.dumps(patient.parameters))
            cases.append(case)
    if "phantom" in kinds:
        scans = []
        for seed in (21, 22):
            p = make_phantom(seed)
            path = work / f"phantom_{seed}" / "ct.nii.gz"
            path.parent.mkdir(parents=True)
            sitk.WriteImage(p.ct, str(path), useCompression=True)
            scans.append(Scan(f"phantom {seed}", p.ct, p.labels, p.names, path))
        wanted = dict(list(PHANTOM.items())[:3]) if quick else PHANTOM
        cases.append(Case("phantom: 21 -> 22", scans[0], scans[1], in_both(wanted, *scans)))
    if "dicom" in kinds:
        folder = DATA / "abdomen_ct_dicom_example"
        ct = sitk.DICOMOrient(_read_dicom(folder), "LPS")
        query = Scan("abdomen DICOM (20 slices)", ct, None, {}, folder)
        case = Case("dicom: example -> 20-slice upper abdomen", example, query, PELVIC, axial_search="coarse")
        cases.append(case)
    return cases


def _z_mm(image: sitk.Image, index: int) -> float:
    return image.TransformIndexToPhysicalPoint((0, 0, int(index)))[2]


def fov_ceiling(case: Case) -> dict[str, float] | None:
    """Per structure, the Dice of a draft that is the reference exactly, but only on the query's levels
    the source scan shows (mapped by the vertebral endplates both scans show), and nothing beyond them.

    Support slices and the atlas show a structure only where the source scan does, so this is what a
    perfect copy of the examples could reach; the network may exceed it by drawing beyond what it was
    shown. None when the scans share fewer than two endplates (virtual and phantom cases: whole).
    """
    src, qry = case.source, case.query
    if src.labels is None or qry.labels is None:
        return None

    def endplates(scan: Scan) -> dict[tuple[str, int], float]:
        """Each vertebra's lower and upper end (mm), where the scan does not cut it."""
        array, out = sitk.GetArrayViewFromImage(scan.labels), {}
        for name, value in scan.names.items():
            if name.startswith("vertebrae_"):
                zs = np.flatnonzero((array == value).any(axis=(1, 2)))
                for end, index in ((0, zs[0]), (1, zs[-1])) if len(zs) else ():
                    if 0 < index < array.shape[0] - 1:
                        out[(name, end)] = _z_mm(scan.labels, index)
        return out

    a, b = endplates(src), endplates(qry)
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    slope, offset = np.polyfit([a[n] for n in shared], [b[n] for n in shared], 1)
    half = src.labels.GetSpacing()[2] / 2  # a slice reaches half its thickness beyond its centre
    first, last = sorted(_z_mm(src.labels, i) for i in (0, src.labels.GetSize()[2] - 1))
    ends = sorted(slope * z + offset for z in (first - half, last + half))
    z = np.array([_z_mm(qry.labels, i) for i in range(qry.labels.GetSize()[2])])
    inside = (z >= ends[0]) & (z <= ends[1])
    ceiling = {}
    for structure, parts in case.structures.items():
        ref = qry.mask(structure, parts)
        total = ref.sum()
        if total:
            share = ref[inside].sum() / total
            ceiling[structure] = float(2 * share / (1 + share))
    return ceiling


def _read_dicom(folder: Path) -> sitk.Image:
    from autocontour.config import Settings
    from autocontour.dicom.reading import read_input

    return read_input(folder, Settings())[0]


def evaluate(pred: np.ndarray, ref: np.ndarray, spacing_zyx, tolerance_mm: float) -> dict:
    """Dice, NSD at the tolerance and HD95, on the bounding box of both masks (same values, far cheaper)."""
    both = pred | ref
    if both.any():
        lo = np.maximum(np.argwhere(both).min(axis=0) - 2, 0)
        hi = np.argwhere(both).max(axis=0) + 3
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        pred, ref = pred[box], ref[box]
    metrics, _ = compute_metrics(pred, ref, spacing_zyx, (tolerance_mm,))
    return {"dice": metrics["dice"], "nsd": metrics[nsd_key(tolerance_mm)], "hd95": metrics["hd95_mm"],
            "present": bool(ref.any()), "drawn_voxels": int(pred.sum())}


def tolerance(structure: str) -> float:
    return default_definition(structure).nsd_tolerance_mm


def registration_column(case: Case) -> None:
    """The atlas prior alone: one registration per case, each structure's occupancy warped and thresholded;
    nothing drawn where the registration is not `reliable` (too little common length)."""
    started = time.perf_counter()
    cpu = time.process_time()
    source_atlas = make_atlas_ct(case.source.ct)
    query_atlas = make_atlas_ct(case.query.ct)
    registration = register(source_atlas, query_atlas)
    spacing = case.query.ct.GetSpacing()[::-1]
    out = {}
    for structure, parts in case.structures.items():
        occupancy = make_atlas_mask(case.source.mask(structure, parts), case.source.ct, source_atlas)
        prior = sitk.GetArrayFromImage(to_grid(registration.warp(occupancy), case.query.ct)) >= 0.5
        prior &= registration.reliable  # an unreliable registration draws nothing
        out[structure] = (evaluate(prior, case.query.mask(structure, parts), spacing, tolerance(structure))
                          if case.query.labels is not None else {"drawn_voxels": int(prior.sum()), "present": False})
    case.results["registration"] = out
    case.seconds["registration"] = round(time.perf_counter() - started, 1)
    case.seconds["of which registering"] = registration.diagnostics["seconds"]
    case.seconds["registering, CPU"] = registration.diagnostics["cpu_seconds"]
    case.seconds["registration column, CPU"] = round(time.process_time() - cpu, 1)
    case.notes.append("registration: " + json.dumps(registration.diagnostics))


def build_sets(case: Case, support_size: int, work: Path, only: list[str] | None) -> list[str]:
    """Support sets (format 2, with atlas copies) from the source patient, one per structure it labels
    (those in `only`, when given), as `autocontour support build` makes them; returns their names."""
    from autocontour.support.build import build_support_set

    if case.built is not None:
        return case.built
    source_mask_dir = work / "masks"
    source_mask_dir.mkdir(parents=True)
    source_ct = source_mask_dir / "ct.nii.gz"
    sitk.WriteImage(case.source.ct, str(source_ct), useCompression=True)
    built = []
    for structure, parts in case.structures.items():
        mask = case.source.mask(structure, parts)
        if not mask.any() or (only is not None and structure not in only):
            continue
        mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
        mask_image.CopyInformation(case.source.ct)
        mask_path = source_mask_dir / f"{structure}.nii.gz"
        sitk.WriteImage(mask_image, str(mask_path), useCompression=True)
        build_support_set(structure, structure, [(source_ct, mask_path)], work / "sets" / structure,
                          size=support_size, label=1, preview=False, source=case.source.name,
                          definition=default_definition(structure, max_components=PIECES.get(structure)))
        built.append(structure)
    case.built = built
    return built


def run_product(case: Case, segmenter, structures: list[str], support_size: int, **options) -> tuple[dict, dict]:
    """`Segmenter.segment` on the query, a few structures per call: masks and probabilities (canonical LPS
    arrays, probabilities only if asked for) and each structure's summary entry."""
    masks, summaries = {}, {}
    for first in range(0, len(structures), STRUCTURES_PER_CALL):
        chosen = SegmentOptions(structures=structures[first:first + STRUCTURES_PER_CALL],
                                support_size=support_size, preview=False, **options)
        result = segmenter.segment(case.query.path, None, chosen)
        for name in result.masks:
            image = result.probabilities.get(name, result.masks[name])
            masks[name] = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
        summaries |= result.summary.structures
    return masks, summaries


def score_masks(case: Case, masks: dict[str, np.ndarray], summaries: dict) -> dict:
    spacing = case.query.ct.GetSpacing()[::-1]
    out = {}
    for structure, mask in masks.items():
        drawn = mask > 0
        entry = summaries[structure]
        noted = {"status": entry.status, "confidence": entry.confidence,
                 "network_confidence": entry.network_confidence}
        if case.query.labels is None:
            out[structure] = {"drawn_voxels": int(drawn.sum()), "present": False} | noted
        else:
            out[structure] = evaluate(drawn, case.query.mask(structure, case.structures[structure]), spacing,
                                      tolerance(structure)) | noted
    return out


def confidence_table(cases: list[Case], columns: list[str]) -> list[str]:
    """How well the structure confidence ranks the true quality, per column: Spearman's rho against Dice and
    surface Dice over every drawn structure present in its query, and the mean absolute error of the confidence
    read as an estimate of surface Dice; the network's own confidence beside the discounted one."""
    lines = ["| column | n | confidence | rho vs Dice | rho vs surface Dice | mean abs. error vs surface Dice |",
             "|---|---|---|---|---|---|"]
    for column in columns:
        rows = [r for case in cases for r in case.results.get(column, {}).values()
                if r.get("present") and r.get("confidence") is not None]
        if len(rows) < 3:
            continue
        truth = {"dice": [r["dice"] for r in rows], "nsd": [r["nsd"] for r in rows]}
        for key in ("network_confidence", "confidence"):
            values = [r[key] for r in rows]
            rho = {m: stats.spearmanr(values, truth[m]).statistic for m in truth}
            error = float(np.mean(np.abs(np.asarray(values) - np.asarray(truth["nsd"]))))
            lines.append(f"| {column} | {len(rows)} | {key} | {rho['dice']:.3f} | {rho['nsd']:.3f} | {error:.3f} |")
    return lines


def network_column(case: Case, segmenter, support_size: int, work: Path, only: list[str] | None,
                   column: str = "network") -> None:
    """The network alone through the product path: no registration prior, every body slice searched
    (the DICOM case keeps the default localisation: what it must show is `not_in_scan`)."""
    built = build_sets(case, support_size, work, only)
    started = time.perf_counter()
    masks, summaries = run_product(case, segmenter, built, support_size, axial_search=case.axial_search,
                                   registration=False)
    case.seconds[column] = round(time.perf_counter() - started, 1)
    case.results[column] = score_masks(case, masks, summaries)


def hybrid_column(case: Case, segmenter, support_size: int, work: Path, only: list[str] | None,
                  fusion: dict, column: str = "hybrid") -> None:
    """The product's default path: registration prior (window, levels, fusion) and the network."""
    built = build_sets(case, support_size, work, only)
    started = time.perf_counter()
    masks, summaries = run_product(case, segmenter, built, support_size, **fusion)
    case.seconds[column] = round(time.perf_counter() - started, 1)
    case.results[column] = score_masks(case, masks, summaries)
    priors = {n: s.registration_prior for n, s in summaries.items() if s.registration_prior}
    if priors:
        first = next(iter(priors.values()))["registrations"]
        case.notes.append("hybrid prior: " + json.dumps(first))


GATES = (None, 10.0, 20.0, 40.0)  # the fusion gates --choose-fusion tries (mm)
FUSION_WEIGHTS = tuple(round(w, 2) for w in np.arange(0.0, 1.01, 0.1))
SILENT_SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # network-silent fallbacks it tries
# (share, which network voxels count: `network_silent`'s `within`); None: never fall back
SILENT_RULES = (None, *((share, within) for within in ("gate", "prior") for share in SILENT_SHARES))
SilentRule = tuple[float, SilentWithin] | None


@dataclass
class FusionInput:
    """One case-structure for --choose-fusion: the network's and the prior's probabilities and the reference,
    cut to a box around all three (the gates stay inside it), and the registration's final metric."""

    network: np.ndarray
    prior: np.ndarray
    reference: np.ndarray
    spacing_zyx: tuple
    metric: float
    scores: dict = field(default_factory=dict)  # (weight, gate, silent rule) -> Dice of the fused mask
    gates: dict = field(default_factory=dict)  # gate -> where the network counts (`autocontour.engine.fusion.gate`)

    def fused(self, weight: float, gate_mm: float | None, silent: SilentRule = None) -> np.ndarray:
        """The fused mask (`autocontour.engine.fusion.fuse`), the prior alone where the network is silent
        (`network_silent` by the rule `silent`; None: never)."""
        if self.silent(gate_mm, silent):
            weight = 1.0
        return fuse(self.network.astype(np.float32), self.prior.astype(np.float32), weight, self.near(gate_mm)) >= 0.5

    def near(self, gate_mm: float | None) -> np.ndarray | None:
        """Where the network counts at this gate (`autocontour.engine.fusion.gate`), computed once."""
        if gate_mm not in self.gates:
            self.gates[gate_mm] = gate(self.prior.astype(np.float32), gate_mm, self.spacing_zyx)
        return self.gates[gate_mm]

    def silent(self, gate_mm: float | None, rule: SilentRule) -> bool:
        """Whether the engine would draw the prior alone here (`autocontour.engine.fusion.network_silent`)."""
        return rule is not None and network_silent(self.network.astype(np.float32), self.prior.astype(np.float32),
                                                   self.near(gate_mm), *rule)

    def fused_dice(self, weight: float, gate_mm: float | None, silent: SilentRule = None) -> float:
        key = (round(weight, 3), gate_mm, silent)
        if key not in self.scores:
            self.scores[key] = dice(self.fused(weight, gate_mm, silent), self.reference)
        return self.scores[key]

    def cleaned_dice(self, mask: np.ndarray, pieces: int, with_prior: bool) -> float:
        """Dice after the product's clean-up (holes, then components; `with_prior`: pieces the prior places
        are kept whatever their rank, `autocontour.postprocess.keep_components`)."""
        from autocontour.postprocess import fill_holes_per_slice, keep_components

        supported = self.prior.astype(np.float32) >= 0.5 if with_prior else None
        return dice(keep_components(fill_holes_per_slice(mask), pieces, supported), self.reference)


def fusion_inputs(case: Case, segmenter, support_size: int, work: Path, only: list[str] | None) -> dict:
    """What the fusion is chosen from: the network's probability on the prior's window (weight 0, no gate)
    and the prior's (weight 1), both through the product path, with each structure's reference."""
    built = build_sets(case, support_size, work, only)
    network, _ = run_product(case, segmenter, built, support_size, prior_weight=0.0, prior_gate_mm=None,
                             probabilities=True)
    prior, summaries = run_product(case, segmenter, built, support_size, prior_weight=1.0, probabilities=True)
    spacing = case.query.ct.GetSpacing()[::-1]
    margin = int(np.ceil(max(g or 0 for g in GATES) / min(spacing))) + 1
    out = {}
    for s in built:
        described = summaries[s].registration_prior
        if not (group_of(s) == "main" or case.name.startswith("phantom")) or described is None:
            continue
        reference = case.query.mask(s, case.structures[s])
        box = _box(network[s] >= 0.05, prior[s] >= 0.05, reference, margin=margin)
        out[s] = FusionInput(network[s][box].astype(np.float16), prior[s][box].astype(np.float16), reference[box],
                             spacing, float(np.mean([described["registrations"][c]["metric"]
                                                     for c in described["source_cases"]])))
    return out


def _box(*masks: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of the masks' union, grown by `margin` voxels (the fusion's gates stay inside it)."""
    points = np.argwhere(np.logical_or.reduce(masks))
    if points.size == 0:
        return tuple(slice(0, 0) for _ in masks[0].shape)
    return tuple(slice(max(0, lo - margin), hi + margin + 1) for lo, hi in zip(points.min(0), points.max(0),
                                                                                strict=True))


def choose_fusion(inputs: list[tuple[str, dict]]) -> str:
    """The engine's fusion chosen on every case's main structures: a prior weight for poorly and for well
    registered scans (`autocontour.engine.fusion.prior_weight_for`: a ramp between METRIC_POOR and METRIC_GOOD) and one
    gate, by the mean Dice over all case-structures. Computed on the query's grid (the engine gates on the
    model grid), inside a box around everything drawn or true, and without the engine's rule of the network
    alone beyond a source scan's end (the prior's run has no network there)."""
    items = [(f"{case}: {s}", x) for case, structures in inputs for s, x in structures.items()
             if x.reference.any()]  # a structure absent from the query has nothing to score
    poorly = [(k, x) for k, x in items if x.metric > (METRIC_POOR + METRIC_GOOD) / 2]
    well = [(k, x) for k, x in items if x.metric <= (METRIC_POOR + METRIC_GOOD) / 2]
    lines = [f"Registrations ending above a Mattes metric of {(METRIC_POOR + METRIC_GOOD) / 2:g} count as poor "
             f"({len(poorly)} case-structures), the rest as good ({len(well)}). Mean Dice of the fused mask for "
             "one weight everywhere:", "",
             "| weight | " + " | ".join(f"{cls}, {f'gate {g:g} mm' if g else 'no gate'}" for cls in ("poor", "good")
                                     for g in GATES) + " |",
             "|---|" + "---|" * 2 * len(GATES)]
    for w in FUSION_WEIGHTS:
        cells = [f"{np.mean([x.fused_dice(w, g) for _, x in group]):.3f}" if group else "n/a"
                 for group in (poorly, well) for g in GATES]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    scores = {(poor, good, g): float(np.mean([x.fused_dice(prior_weight_for(x.metric, poor, good), g)
                                              for _, x in items]))
              for poor in FUSION_WEIGHTS for good in FUSION_WEIGHTS for g in GATES}
    best = max(scores, key=lambda k: (scores[k], -abs(k[0] - k[1])))
    poor, good, gate = best
    single = max(((w, g) for w in FUSION_WEIGHTS for g in GATES),
                 key=lambda k: float(np.mean([x.fused_dice(k[0], k[1]) for _, x in items])))
    single_score = float(np.mean([x.fused_dice(*single) for _, x in items]))
    lines += ["", f"Best: weight {poor} for poor registrations, {good} for good ones (ramp from metric "
              f"{METRIC_POOR:g} to {METRIC_GOOD:g}), gate {gate} mm: mean Dice {scores[best]:.3f} over {len(items)} "
              f"case-structures (threshold 0.5, before clean-up); the best single weight ({single[0]}, gate "
              f"{single[1]} mm) gives {single_score:.3f}.", "",
              "At that choice, the prior drawn alone where the network draws less than a share of the prior's "
              "likely volume (`autocontour.engine.fusion.network_silent`), counting the network's voxels inside "
              "the gate "
              "or only those inside the prior's likely region:", "",
              "| share | network voxels counted | mean Dice | case-structures where it falls back |",
              "|---|---|---|---|"]
    silent, falls_back = {}, {}
    for rule in SILENT_RULES:
        silent[rule] = float(np.mean([x.fused_dice(prior_weight_for(x.metric, poor, good), gate, rule)
                                      for _, x in items]))
        falls_back[rule] = sum(x.silent(gate, rule) for _, x in items)
        share_cell, within_cell = rule if rule is not None else ("never", "")
        lines.append(f"| {share_cell} | {within_cell} | {silent[rule]:.3f} | {falls_back[rule]} |")
    # ties go to the rule that falls back least often
    rule = max(SILENT_RULES, key=lambda k: (round(silent[k], 4), -falls_back[k]))
    lines += ["", f"Best rule: {rule or 'never'} (mean Dice {silent[rule]:.3f}). At the full choice, against the "
              "network alone on the prior's window (weight 0, no gate) and the prior alone (weight 1); then the "
              "fused mask after the product's clean-up, keeping the structure's largest pieces only and also every "
              "piece the prior places (`autocontour.postprocess.keep_components`):", "",
              "| case: structure | registration metric | weight | network (window) | prior | fused "
              "| cleaned, largest pieces | cleaned, + prior's pieces |",
              "|---|---|---|---|---|---|---|---|"]
    cleaned = {False: [], True: []}
    for key, x in items:
        w = prior_weight_for(x.metric, poor, good)
        mask, pieces = x.fused(w, gate, rule), PIECES.get(key.rsplit(": ", 1)[1], 1)
        for with_prior in cleaned:
            cleaned[with_prior].append(x.cleaned_dice(mask, pieces, with_prior))
        lines.append(f"| {key} | {x.metric:.3f} | {w:.2f} | {x.fused_dice(0.0, None):.3f} "
                     f"| {x.fused_dice(1.0, None):.3f} | {x.fused_dice(w, gate, rule):.3f} "
                     f"| {cleaned[False][-1]:.3f} | {cleaned[True][-1]:.3f} |")
    lines += ["", f"Mean after the clean-up: largest pieces only {np.mean(cleaned[False]):.3f}, with the prior's "
              f"pieces {np.mean(cleaned[True]):.3f}."]
    return "\n".join(lines)


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def cell(metrics: dict | None) -> str:
    if metrics is None:
        return "n/a"
    if not metrics["present"]:
        status = f", {metrics['status']}" if "status" in metrics else ""
        drawn = f"DRAWN {metrics['drawn_voxels']} vx" if metrics["drawn_voxels"] else "not drawn"
        return f"absent: {drawn}{status}"
    return f"{_fmt(metrics['dice'])} / {_fmt(metrics['nsd'])} / {_fmt(metrics['hd95'], 1)}"


def means(results: dict, structures: list[str]) -> dict | None:
    rows = [results[s] for s in structures if s in results and results[s]["present"]]
    if not rows:
        return None
    hd = [r["hd95"] for r in rows if r["hd95"] is not None]
    return {"dice": float(np.mean([r["dice"] for r in rows])), "nsd": float(np.mean([r["nsd"] for r in rows])),
            "hd95": float(np.mean(hd)) if hd else None, "n": len(rows), "missed_hd": len(rows) - len(hd)}


def merge_baseline(cases: list[Case], saved: dict) -> None:
    """A previous run's network and hybrid columns (`--json-out`, same cases) as this run's baseline columns."""
    for case in cases:
        for column in ("network", "hybrid"):
            previous = saved.get(case.name, {}).get("results", {}).get(column)
            if previous is not None and column + BASELINE not in case.results:
                case.results[column + BASELINE] = previous
                case.seconds[column + BASELINE] = saved[case.name]["seconds"].get(column)


def columns_of(cases: list[Case]) -> list[str]:
    """The columns any case has, baseline checkpoint beside each: network (baseline), network, registration..."""
    present = {c for case in cases for c in case.results}
    order = [f"{c}{suffix}" for c in COLUMNS for suffix in (BASELINE, "")]
    return [c for c in order if c in present]


def summary(cases: list[Case], columns: list[str]) -> list[str]:
    """One line per case: the mean Dice of its headline group per column, and new minus baseline."""
    lines = ["| case | group | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for case in cases:
        groups = [group_of(s) for s in case.structures]
        group = "main" if "main" in groups else groups[0] if groups else ""
        members = [s for s in case.structures if group_of(s) == group]
        cells = []
        for c in columns:
            m = means(case.results.get(c, {}), members)
            base = means(case.results.get(c + BASELINE, {}), members) if not c.endswith(BASELINE) else None
            delta = f" ({m['dice'] - base['dice']:+.3f})" if m and base else ""
            cells.append("n/a" if m is None else f"{m['dice']:.3f}{delta}")
        lines.append(f"| {case.name} | {group} | " + " | ".join(cells) + " |")
    return lines


def report(cases: list[Case], args) -> str:
    columns = columns_of(cases)
    lines = [f"Cells: Dice / surface Dice at the structure's tolerance (2 mm) / HD95 (mm). support size "
             f"{args.support_size}, threads {args.threads}. Absent = not in the query scan: must not be drawn.", ""]
    if any(c.endswith(BASELINE) for c in columns):
        lines += [f"Weights: {args.weights or 'the shipped default'}; baseline{BASELINE}: "
                  f"{args.baseline_weights or f'from {args.baseline_results}'}.",
                  "", "Mean Dice of each case's headline group (in brackets: minus the baseline checkpoint's):", ""]
        lines += summary(cases, columns) + [""]
    lines += ["Confidence against quality:", ""] + confidence_table(cases, columns) + [""]
    for case in cases:
        lines += [f"### {case.name}", "",
                  "| structure | group | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for structure in case.structures:
            cells = [cell(case.results.get(c, {}).get(structure)) for c in columns]
            lines.append(f"| {structure} | {group_of(structure)} | " + " | ".join(cells) + " |")
        groups = {}
        for structure in case.structures:
            groups.setdefault(group_of(structure), []).append(structure)
        for group, members in groups.items():
            cells = []
            for c in columns:
                m = means(case.results.get(c, {}), members)
                cells.append("n/a" if m is None else
                             f"**{_fmt(m['dice'])}** / {_fmt(m['nsd'])} / {_fmt(m['hd95'], 1)} (n={m['n']})")
            lines.append(f"| **mean, {group}** | | " + " | ".join(cells) + " |")
        ceiling = fov_ceiling(case)
        if ceiling:
            by_group = {g: [ceiling[s] for s in m if s in ceiling] for g, m in groups.items()}
            lines += ["", "Field-of-view ceiling (Dice of the reference kept only on the levels the source scan shows, "
                      "mapped by the vertebral endplates both show): "
                      + ", ".join(f"{s} {v:.2f}" for s, v in ceiling.items()) + "; "
                      + ", ".join(f"**mean, {g} {np.mean(v):.3f}**" for g, v in by_group.items() if v) + "."]
        drawn_absent = {c: sum(1 for r in case.results.get(c, {}).values() if not r["present"] and r["drawn_voxels"])
                        for c in columns if c in case.results}
        timing = ", ".join(f"{k} {v} s" for k, v in case.seconds.items())
        lines += ["", f"Wall time: {timing}. Absent structures drawn: "
                  + (", ".join(f"{c} {n}" for c, n in drawn_absent.items()) or "n/a") + ".", ""]
        lines += [f"<sub>{note}</sub>" for note in case.notes] + [""]
    return "\n".join(lines)


def write_results(text: str, command: str) -> None:
    """Replace (or append) the benchmark's section of bench/RESULTS.md."""
    body = RESULTS.read_text()
    section = f"{SECTION} (`bench/cross_patient.py`)\n\n```\n$ {command}\n```\n\n{text}\n"
    start = body.find(SECTION)
    if start < 0:
        RESULTS.write_text(body.rstrip() + "\n\n" + section)
        return
    end = body.find("\n## ", start + len(SECTION))
    RESULTS.write_text(body[:start] + section + (body[end + 1:] if end >= 0 else ""))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="real,virtual,phantom,dicom")
    parser.add_argument("--structures", default=None, help="comma-separated benchmark structures (default: all)")
    parser.add_argument("--columns", default="network,registration,hybrid")
    parser.add_argument("--choose-fusion", action="store_true",
                        help="measure every prior weight and gate on the main structures and print the table")
    parser.add_argument("--fusion-inputs", type=Path, default=None,
                        help="with --choose-fusion: also save what it measured here (pickle), to re-read later")
    parser.add_argument("--fusion-from", type=Path, default=None,
                        help="choose the fusion from inputs an earlier --fusion-inputs saved, running no case")
    parser.add_argument("--prior-weight", type=float, default=None, help="hybrid: fusion weight (default: engine's)")
    parser.add_argument("--crops", action="store_true", help="hybrid: fine pass on structure-centred crops")
    parser.add_argument("--network-cases", default="real,virtual,phantom,dicom",
                        help="case kinds the network column runs on (it costs minutes per structure on a CPU)")
    parser.add_argument("--hybrid-cases", default="real,virtual,phantom,dicom",
                        help="case kinds the hybrid column runs on (its network work is limited to the prior's window)")
    parser.add_argument("--network-structures", default=None,
                        help="limit the network and hybrid columns to these structures")
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint to measure (default: the shipped one)")
    parser.add_argument("--baseline-weights", type=Path, default=None,
                        help="a previous checkpoint: network and hybrid columns again with it, in the same run")
    parser.add_argument("--baseline-columns", default="network,hybrid",
                        help="the columns --baseline-weights runs (default network,hybrid)")
    parser.add_argument("--baseline-results", type=Path, default=None,
                        help="a previous run's --json-out: its network and hybrid columns as the baseline's")
    parser.add_argument("--json-out", type=Path, default=None, help="write every case's results as JSON here")
    parser.add_argument("--support-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-results", action="store_true")
    return parser.parse_args(argv), parser


def chosen_structures(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    every = {**MAIN, **SMALL, **BONES}
    if not args.structures:
        return {s: every[s] for s in QUICK} if args.quick else every
    wanted = [s.strip() for s in args.structures.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in every]
    if unknown:
        parser.error(f"unknown structures {unknown}; choose from {', '.join(every)}")
    return {s: every[s] for s in wanted}


def run_case(case: Case, case_work: Path, args: argparse.Namespace, columns: list[str], fusion: dict,
             fusion_cases: list[tuple[str, dict]]) -> None:
    """One case's columns (each run only where its --*-cases lets it), timings printed as they finish."""
    from autocontour.config import Settings
    from autocontour.pipeline import Segmenter

    def segmenter_for(support_dir: Path, weights: Path | None) -> Segmenter:
        return Segmenter(settings=Settings(threads=args.threads), weights=weights, support_dirs=[support_dir],
                         shipped_support=False)

    print(f"== {case.name}: {len(case.structures)} structures", flush=True)
    if "registration" in columns:
        registration_column(case)
        print(f"   registration {case.seconds['registration']} s", flush=True)
    kind = case.name.split(":")[0]
    runs = {"network": kind in args.network_cases.split(",") and "network" in columns,
            "hybrid": kind in args.hybrid_cases.split(",") and "hybrid" in columns,
            "hybrid+planes": kind in args.hybrid_cases.split(",") and "hybrid+planes" in columns}
    runs_fusion = kind in args.network_cases.split(",") and args.choose_fusion
    only = args.network_structures.split(",") if args.network_structures else None
    if not (any(runs.values()) or runs_fusion):
        return
    build_sets(case, args.support_size, case_work, only)
    segmenter = segmenter_for(case_work / "sets", args.weights)
    baseline = segmenter_for(case_work / "sets", args.baseline_weights) if args.baseline_weights else None
    for column, chosen in (("network", baseline), ("network", segmenter), ("hybrid", baseline),
                           ("hybrid", segmenter), ("hybrid+planes", segmenter)):
        if chosen is None or not runs[column] or (chosen is baseline and
                                                  column not in args.baseline_columns.split(",")):
            continue
        name = column + (BASELINE if chosen is baseline else "")
        if column == "network":
            network_column(case, chosen, args.support_size, case_work, only, column=name)
        else:
            planes = {"planes": "three"} if column == "hybrid+planes" else {}
            hybrid_column(case, chosen, args.support_size, case_work, only, fusion | planes, column=name)
        print(f"   {name} {case.seconds[name]} s", flush=True)
    if runs_fusion and case.query.labels is not None:
        fusion_cases.append((case.name, fusion_inputs(case, segmenter, args.support_size, case_work, only)))


def finish(cases: list[Case], args: argparse.Namespace, fusion_cases: list[tuple[str, dict]],
           argv: list[str] | None) -> None:
    """The report: printed, and with --write-results written into bench/RESULTS.md."""
    if args.baseline_results:
        merge_baseline(cases, json.loads(args.baseline_results.read_text()))
    if args.json_out:
        args.json_out.write_text(json.dumps({c.name: {"results": c.results, "seconds": c.seconds} for c in cases},
                                            indent=1))
    text = report(cases, args)
    if fusion_cases and args.fusion_inputs:
        args.fusion_inputs.write_bytes(pickle.dumps(fusion_cases))
    if fusion_cases:
        text += "\n### Choosing the fusion\n\n" + choose_fusion(fusion_cases) + "\n"
    print(text)
    if args.write_results:
        write_results(text, "python bench/cross_patient.py " + " ".join(argv if argv is not None else sys.argv[1:]))


def main(argv: list[str] | None = None) -> None:
    args, parser = parse_args(argv)
    if args.fusion_from:
        print("### Choosing the fusion\n\n" + choose_fusion(pickle.loads(args.fusion_from.read_bytes())))
        return
    os.environ["AUTOCONTOUR_THREADS"] = str(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    structures = chosen_structures(args, parser)
    columns = [c.strip() for c in args.columns.split(",")]
    fusion = ({} if args.prior_weight is None else {"prior_weight": args.prior_weight}) | {"crops": args.crops}
    fusion_cases: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="cross_patient_") as tmp:
        work = Path(tmp)
        cases = build_cases([k.strip() for k in args.cases.split(",")], structures, work, args.quick)
        for number, case in enumerate(cases):
            run_case(case, work / f"case{number}", args, columns, fusion, fusion_cases)
    finish(cases, args, fusion_cases, argv)


if __name__ == "__main__":
    main()
