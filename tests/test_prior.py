"""Support sets of format 2 (atlas copies) and the registration prior through `Segmenter.segment`.

Phantoms and the seeded small network only: the prior's geometry is what is tested here; its
benefit on real patients is measured by bench/cross_patient.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autocontour.engine.fusion import (
    METRIC_GOOD,
    METRIC_POOR,
    NETWORK_SILENT_SHARE,
    PRIOR_WEIGHT_GOOD,
    PRIOR_WEIGHT_POOR,
    fuse_prediction,
    network_silent,
    prior_weight_for,
)
from autocontour.engine.prediction import StructurePrediction
from autocontour.errors import SupportSetError
from autocontour.options import SegmentOptions
from autocontour.pipeline import Segmenter
from autocontour.preprocess import ModelInput, PreprocessSpec
from autocontour.support.build import build_support_set
from autocontour.support.prior import StructurePrior
from autocontour.support.store import FORMAT_VERSION, MANIFEST, load_support_set, save_support_set
from autocontour.training.virtual import smooth_deformation


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture(scope="module")
def bladder_set(tmp_path_factory, phantom_cases):
    out = tmp_path_factory.mktemp("prior") / "urinary_bladder"
    names = {v: int(k) for k, v in json.loads((phantom_cases[0][1].parent / "labels.json").read_text()).items()}
    return build_support_set("urinary_bladder", "urinary_bladder", phantom_cases, out, size=8,
                             label=names["urinary_bladder"], preview=False, symmetric=True), names


@pytest.fixture(scope="module")
def deformed_query(tmp_path_factory, phantom_cases):
    """Phantom case 0 bent smoothly and shifted: a new 'patient' whose bladder is known."""
    ct = sitk.ReadImage(str(phantom_cases[0][0]))
    labels = sitk.ReadImage(str(phantom_cases[0][1]))
    move = sitk.CompositeTransform(3)
    move.AddTransform(sitk.TranslationTransform(3, [6.0, -4.0, 8.0]))
    move.AddTransform(smooth_deformation(ct, 4.0, np.random.default_rng(5)))
    folder = tmp_path_factory.mktemp("query")
    sitk.WriteImage(sitk.Resample(ct, ct, move, sitk.sitkLinear, -1000.0, sitk.sitkInt16), str(folder / "ct.nii.gz"))
    truth = sitk.Resample(labels, labels, move, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return folder / "ct.nii.gz", truth


def test_a_built_set_keeps_small_atlas_copies_and_says_how_big(bladder_set):
    support, _ = bladder_set
    assert support.manifest.format_version == FORMAT_VERSION == 2
    for case in support.manifest.source_cases:
        assert case.atlas is not None and case.atlas.spacing_mm == 4.0
        files = list((support.path / case.atlas.folder).iterdir())
        assert case.atlas.bytes == sum(f.stat().st_size for f in files) and 0 < case.atlas.bytes < 1_000_000
    assert set(support.atlas_cases()) == {"case0", "case1"}
    assert support.describe()["atlas_bytes"] == sum(c.atlas.bytes for c in support.manifest.source_cases)


def test_a_modified_atlas_copy_is_refused(tmp_path, bladder_set):
    support, _ = bladder_set
    copy = tmp_path / "set"
    shutil.copytree(support.path, copy)
    mask = copy / support.manifest.source_cases[0].atlas.folder / "atlas_mask.nii.gz"
    image = sitk.ReadImage(str(mask))
    sitk.WriteImage(image * 0, str(mask), useCompression=True)
    with pytest.raises(SupportSetError, match="atlas copy of case0"):
        load_support_set(copy)


def test_the_prior_segments_a_new_patient_and_never_uses_its_own_case(small_weights, bladder_set, deformed_query,
                                                                       phantom_cases):
    support, names = bladder_set
    segmenter = Segmenter(weights=small_weights, device="cpu", support_dirs=[support.path], shipped_support=False)
    query, truth = deformed_query
    # the prior alone (weight 1): what the registered source cases say the bladder is
    result = segmenter.segment(query, None,
                               SegmentOptions(structures="urinary_bladder", support_size=4, prior_weight=1.0))
    entry = result.summary.structures["urinary_bladder"]
    assert entry.registration_prior["source_cases"] == ["case0", "case1"]
    assert entry.localisation.reason.startswith("registration prior")
    assert "registration" in result.summary.timings_s and entry.registration_prior["fusion_weight"] == 1.0
    drawn = sitk.GetArrayFromImage(result.masks["urinary_bladder"]) > 0
    assert dice(drawn, sitk.GetArrayFromImage(truth) == names["urinary_bladder"]) >= 0.8

    # the fused default runs the network on the prior's window only, weighted by the registration's quality
    fused = segmenter.segment(query, None, SegmentOptions(structures="urinary_bladder", support_size=4))
    window = fused.summary.structures["urinary_bladder"].searched_z_mm
    described = fused.summary.structures["urinary_bladder"].registration_prior
    metric = np.mean([described["registrations"][c]["metric"] for c in described["source_cases"]])
    assert described["fusion_weight"] == prior_weight_for(float(metric))
    # the scan was registered once: the second call reused the first's registrations (same diagnostics, timing too)
    assert described["registrations"] == entry.registration_prior["registrations"]
    off = segmenter.segment(query, None,
                            SegmentOptions(structures="urinary_bladder", support_size=4, registration=False))
    assert off.summary.structures["urinary_bladder"].registration_prior is None
    assert window[1] - window[0] < np.subtract(*off.summary.structures["urinary_bladder"].searched_z_mm[::-1])

    # a source case of the set: its own case gives no prior (it would copy its own label)
    own = segmenter.segment(phantom_cases[0][0], None, SegmentOptions(structures="urinary_bladder", support_size=4))
    assert own.summary.structures["urinary_bladder"].registration_prior["source_cases"] == ["case1"]


def test_the_fusion_weight_follows_the_registration_quality():
    """Poorly aligned sources (Mattes metric near 0) get the low weight, well aligned ones the high one,
    and the weight never falls as the alignment improves."""
    metrics = np.linspace(0.0, -0.8, 33)
    weights = [prior_weight_for(float(m)) for m in metrics]
    assert weights[0] == prior_weight_for(METRIC_POOR) == PRIOR_WEIGHT_POOR
    assert weights[-1] == prior_weight_for(METRIC_GOOD) == PRIOR_WEIGHT_GOOD
    assert all(b >= a for a, b in zip(weights, weights[1:], strict=False))
    assert min(weights) >= 0 and max(weights) <= 1


def _prediction_with_prior(network: np.ndarray, prior: np.ndarray, metric: float, covered: np.ndarray | None = None,
                           open_below: bool = False) -> tuple[StructurePrediction, ModelInput]:
    z = network.shape[0]
    grid = sitk.Image(network.shape[2], network.shape[1], z, sitk.sitkUInt8)
    grid.SetSpacing((2.0, 2.0, 3.0))
    view = ModelInput(np.zeros_like(network), grid, np.ones(z, bool), PreprocessSpec())
    covered = np.ones(z, bool) if covered is None else covered
    structure_prior = StructurePrior(prior, covered, open_below, False, ["case0"], {"case0": {"metric": metric}})
    prediction = StructurePrediction(network.copy(), np.ones(z, np.float32), np.ones(z, bool), None, 4, 1,
                                     prior=structure_prior, prior_weight=prior_weight_for(metric))
    return prediction, view


def test_where_the_network_is_silent_the_prior_is_drawn_alone():
    """A poorly aligned prior (weight 0.4) cannot reach 0.5 alone: when the network draws nothing where it places
    the structure, the prior is drawn (weight 1) with a warning; a network that answers keeps the fusion."""
    prior = np.zeros((6, 32, 32), np.float32)
    prior[1:5, 8:20, 8:20] = 0.9
    silent = np.zeros_like(prior)
    silent[2, 10:12, 10:12] = 0.8  # 4 voxels against 576 likely ones: below any share tried
    assert network_silent(silent, prior, None) and 4 < NETWORK_SILENT_SHARE * 576
    prediction, view = _prediction_with_prior(silent, prior, metric=-0.15)
    fuse_prediction(prediction, view, SegmentOptions())
    assert prediction.prior_weight == 1.0 and "registration prior alone" in prediction.warnings[0]
    assert ((prediction.probability >= 0.5) == (prior >= 0.5)).all()

    answering = np.zeros_like(prior)
    answering[1:5, 10:22, 10:22] = 0.95
    assert not network_silent(answering, prior, None)
    prediction, view = _prediction_with_prior(answering, prior, metric=-0.15)
    fuse_prediction(prediction, view, SegmentOptions())
    assert prediction.prior_weight == PRIOR_WEIGHT_POOR and not prediction.warnings
    assert (prediction.probability[1:5, 10:20, 10:20] >= 0.5).all()  # network and prior agree
    assert not (prediction.probability[1:5, 8:10, 8:10] >= 0.5).any()  # the prior alone at 0.4: not drawn

    # a weight the user fixed is kept, silent network or not; a prior with nothing likely has nothing to draw
    prediction, view = _prediction_with_prior(silent, prior, metric=-0.15)
    fuse_prediction(prediction, view, SegmentOptions(prior_weight=0.4))
    assert prediction.prior_weight == 0.4 and (prediction.probability >= 0.5).sum() == 4  # the network's voxels
    assert not network_silent(silent, prior * 0.5, None)


def test_a_silent_network_draws_nothing_beyond_the_sources_field_of_view():
    """The source scans cover slices 2-5 and the structure runs off their lower end: below, the network searches
    alone. A network that answered where the prior could check it keeps its drawing there; one that was silent
    there (a colon drawn in place of a duodenum) is not trusted below either."""
    prior = np.zeros((6, 32, 32), np.float32)
    prior[2:5, 8:20, 8:20] = 0.9
    below = (slice(0, 2), slice(8, 20), slice(8, 20))
    for answers in (True, False):
        network = np.zeros_like(prior)
        network[below] = 0.9
        if answers:
            network[2:5, 8:20, 8:20] = 0.9
        prediction, view = _prediction_with_prior(network, prior, metric=-0.15, covered=np.arange(6) >= 2,
                                                  open_below=True)
        fuse_prediction(prediction, view, SegmentOptions())
        assert (prediction.prior_weight == 1.0) is not answers
        drawn = prediction.probability[below] >= 0.5
        assert drawn.all() if answers else not drawn.any()
        assert (prediction.probability[2:5, 8:20, 8:20] >= 0.5).all()


def test_a_network_that_draws_beside_the_prior_is_silent_on_it_when_only_the_prior_region_counts():
    """Counting only the network's voxels inside the prior's likely region, pieces drawn beside the structure
    (inside the gate) do not count as an answer; counting the gate, they do."""
    prior = np.zeros((6, 32, 32), np.float32)
    prior[1:5, 8:20, 8:20] = 0.9
    beside = np.zeros_like(prior)
    beside[1:5, 21:31, 8:20] = 0.9  # as large as the prior's region, next to it
    near = np.ones(prior.shape, bool)
    assert network_silent(beside, prior, near, 0.5, within="prior")
    assert not network_silent(beside, prior, near, 0.5, within="gate")
    overlapping = np.zeros_like(prior)
    overlapping[1:5, 10:22, 8:20] = 0.9  # 10 of the 12 rows on the prior's region
    assert not network_silent(overlapping, prior, near, 0.5, within="prior")


def test_a_version_1_set_still_loads_and_segments_without_a_prior(tmp_path, small_weights, bladder_set,
                                                                   deformed_query):
    support, _ = bladder_set
    folder = tmp_path / "v1"
    cases = [c.model_copy(update={"atlas": None, "crop_centre_mm": None}) for c in support.manifest.source_cases]
    manifest = support.manifest.model_copy(update={"format_version": 1, "source_cases": cases, "crop": None})
    save_support_set(manifest, support.images, support.labels, folder)
    written = json.loads((folder / MANIFEST).read_text())
    assert written["format_version"] == 1 and not (folder / "atlas").exists()
    segmenter = Segmenter(weights=small_weights, device="cpu", support_dirs=[folder], shipped_support=False)
    result = segmenter.segment(deformed_query[0], None, SegmentOptions(structures="urinary_bladder", support_size=4))
    entry = result.summary.structures["urinary_bladder"]
    assert entry.registration_prior is None and entry.support_set["format_version"] == 1
    assert entry.slices_computed > 0
