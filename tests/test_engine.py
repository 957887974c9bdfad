"""The split engine equals the plain network; batching and planning behave."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest
import torch

from autocontour.engine import Engine, SplitUniverSeg, predict_structures
from autocontour.engine.plan import _main_run
from autocontour.engine.selection import level_members, spread_members
from autocontour.model import UniverSeg
from autocontour.options import ResolvedOptions, SegmentOptions


def _random_model(blocks, seed=0) -> UniverSeg:
    torch.manual_seed(seed)
    model = UniverSeg(blocks).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # non-zero biases catch a bias added twice by the split
    return model


@pytest.mark.parametrize("blocks, b, s, h, w", [
    ([16, 16, 16, 16], 1, 1, 32, 32),
    ([16, 16, 16, 16], 3, 5, 64, 96),
    ([8, 16, 24, 32], 2, 3, 40, 24),
    ([64, 64, 64, 64], 2, 4, 64, 64),
])
def test_split_network_equals_plain_forward(blocks, b, s, h, w):
    model = _random_model(blocks)
    split = SplitUniverSeg(model)
    g = torch.Generator().manual_seed(1)
    q = torch.rand(b, 1, h, w, generator=g)
    images = torch.rand(b, s, 1, h, w, generator=g)
    labels = (torch.rand(b, s, 1, h, w, generator=g) > 0.5).float()
    with torch.no_grad():
        expected = model(q, images, labels)
        got = split(q, images, labels)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_split_network_trains_like_the_plain_one():
    """With gradients on (training), the split network takes its other branches (no in-place add)
    and must give the plain network's gradients, through the pooled and averaged streams too."""
    model = _random_model([8, 16, 16, 16])
    split = SplitUniverSeg(model)
    g = torch.Generator().manual_seed(2)
    q = torch.rand(2, 1, 32, 32, generator=g)
    images = torch.rand(2, 4, 1, 32, 32, generator=g)
    labels = (torch.rand(2, 4, 1, 32, 32, generator=g) > 0.5).float()
    grads = []
    for net in (model, split):
        model.zero_grad()
        net(q, images, labels).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()
                      if p.grad is not None and p.grad.abs().max() > 0})  # the last block's support conv: none
    assert grads[0].keys() == grads[1].keys()
    for name, expected in grads[0].items():
        assert (grads[1][name] - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item()), name


def test_engine_batches_give_the_same_answer_as_one_by_one():
    model = _random_model([16] * 4)
    rng = np.random.default_rng(0)
    queries = rng.random((7, 32, 32), dtype=np.float32)
    pool = np.concatenate([rng.random((10, 1, 32, 32)), rng.random((10, 1, 32, 32)) > 0.5], axis=1).astype(np.float32)
    index = np.stack([rng.choice(10, 3, replace=False) for _ in range(7)])
    one = Engine(model, "cpu", max_pairs_per_batch=3).predict(queries, pool, index)
    many = Engine(model, "cpu", max_pairs_per_batch=21).predict(queries, pool, index)
    assert np.abs(one - many).max() < 1e-5
    with torch.no_grad():
        plain = torch.sigmoid(model(torch.from_numpy(queries[:, None]),
                                    torch.from_numpy(pool[index][:, :, :1]), torch.from_numpy(pool[index][:, :, 1:])))
    assert np.abs(plain.squeeze(1).numpy() - many).max() < 1e-5


def test_out_of_memory_splits_the_batch_instead_of_failing(monkeypatch):
    model = _random_model([8, 8, 8, 8])
    engine = Engine(model, "cpu", max_pairs_per_batch=64)
    real_forward = engine._forward
    sizes = []

    def forward_with_a_memory_ceiling(queries, pool, index, pad_to=None):
        sizes.append(len(queries))
        if len(queries) * index.shape[1] > 8:  # simulated device limit: 8 pairs
            raise torch.OutOfMemoryError("simulated")
        return real_forward(queries, pool, index, pad_to)

    monkeypatch.setattr(engine, "_forward", forward_with_a_memory_ceiling)
    rng = np.random.default_rng(1)
    queries = rng.random((10, 16, 16), dtype=np.float32)
    pool = rng.random((6, 2, 16, 16)).astype(np.float32)
    index = np.tile(np.arange(4), (10, 1))
    out = engine.predict(queries, pool, index)
    assert out.shape == (10, 16, 16) and max(sizes[-3:]) * 4 <= 8 and sizes[0] == 10
    assert np.abs(out - Engine(model, "cpu", max_pairs_per_batch=4).predict(queries, pool, index)).max() < 1e-6


def test_support_member_selection():
    rng = np.random.default_rng(0)
    levels = np.array([-0.1, 0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1])
    allowed = np.ones(10, dtype=bool)
    near = level_members(levels, allowed, 0.05, 3, 2, rng)
    assert sorted(levels[near[0]].tolist()) == [0.0, 0.1, 0.2] or sorted(levels[near[0]].tolist()) == [-0.1, 0.0, 0.1]
    assert all(len(set(m.tolist())) == 3 for m in near)
    spread = spread_members(levels, allowed, 3, 3, rng)
    for member in spread:  # one pick per third of the level range
        picked = sorted(levels[member])
        assert picked[0] <= 0.1 and 0.2 <= picked[1] <= 0.7 and picked[2] >= 0.9
    allowed[[1, 2]] = False
    assert not set(level_members(levels, allowed, 0.05, 3, 1, rng)[0].tolist()) & {1, 2}


def test_options_are_validated():
    with pytest.raises(ValueError):
        SegmentOptions(support_size=0)
    with pytest.raises(ValueError):
        SegmentOptions(axial_search="sometimes")


def _engine_options(**options) -> ResolvedOptions:
    """What the engine runs with: the options resolved, ensemble 1 where none is given."""
    return SegmentOptions(**options).resolved([], support_size=16, ensemble=1, threshold=0.5)


def test_coarse_search_limits_work_to_the_structure(phantom_support_dir, phantom_cases, small_weights):
    """With a support set, the fine pass covers the coarse extent plus one step, not the whole scan."""
    from autocontour.io import CanonicalCT, read_ct
    from autocontour.model.weights import load_model
    from autocontour.preprocess import prepare
    from autocontour.support import discover

    model, _ = load_model(small_weights)
    supports = discover([phantom_support_dir])
    ct = CanonicalCT(read_ct(phantom_cases[0][0]))
    inputs = {n: prepare(ct, s.manifest.preprocessing) for n, s in supports.items()}
    engine = Engine(model, "cpu")
    full = predict_structures(engine, inputs, supports, _engine_options(support_size=4, axial_search="all"))
    for name, prediction in full.items():
        assert prediction.computed.sum() == inputs[name].body_slices.sum()
        assert prediction.probability.min() >= 0 and prediction.probability.max() <= 1
    coarse = predict_structures(engine, inputs, supports, _engine_options(support_size=4, ensemble=2))
    for _name, prediction in coarse.items():
        if prediction.extent is not None:
            lo, hi = prediction.extent
            zs = np.nonzero(prediction.computed)[0]
            assert zs.min() >= lo - 3 and zs.max() <= hi + 3
        assert ((prediction.agreement >= 0) & (prediction.agreement <= 1)).all()


def test_compiled_engine_equals_eager_and_pads_batches():
    model = _random_model([8, 8, 8, 8])
    rng = np.random.default_rng(2)
    queries = rng.random((5, 32, 32), dtype=np.float32)
    pool = rng.random((6, 2, 32, 32)).astype(np.float32)
    index = np.stack([rng.choice(6, 2, replace=False) for _ in range(5)])
    eager = Engine(model, "cpu", max_pairs_per_batch=4).predict(queries, pool, index)
    compiled = Engine(model, "cpu", max_pairs_per_batch=4, compile=True)
    assert compiled.compiled
    assert np.abs(compiled.predict(queries, pool, index) - eager).max() < 1e-5  # 5 queries in batches of 2: last padded


def test_the_structure_is_the_largest_axial_run():
    areas = {0: 0, 3: 50, 6: 400, 9: 380, 12: 0, 15: 90, 30: 0, 33: 20, 36: 0}
    assert _main_run(areas, 3) == [3, 6, 9, 15]  # 15 bridges one missed coarse slice; 33 is a stray
    assert _main_run({0: 0, 3: 1}, 3) == []


def test_the_gpu_benchmark_needs_no_simpleitk():
    """bench/gpu.sh runs bench/engine.py on a machine without SimpleITK, nibabel or MONAI."""
    import subprocess

    from conftest import ROOT

    code = ("import sys, runpy; sys.modules.update(SimpleITK=None, nibabel=None, monai=None)\n"
            f"runpy.run_path({str(ROOT / 'bench' / 'engine.py')!r}, run_name='bench')\n"
            "from autocontour.engine import Engine; import autocontour.engine.runner")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_cpu_engine_reuses_freed_memory_instead_of_mapping_it_again():
    Engine(_random_model([8] * 4), "cpu")  # a CPU engine sets the allocator up
    size = 64 << 20  # one feature-map batch: far above glibc's default mmap threshold
    pages = size // resource.getpagesize()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(size // 4)  # allocated, every page written, freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 3 * pages  # mapped afresh each time, it would fault in every page ten times
