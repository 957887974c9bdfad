"""The network reproduces the reference UniverSeg, and checkpoints load safely."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA
from safetensors.torch import load_file, save_file

from autocontour.errors import WeightsError
from autocontour.model import UniverSeg
from autocontour.model.weights import RESEARCH_ONLY_NOTICE, load_model

FIXTURES = DATA / "universeg_v1"
TOLERANCE = 1e-5


def _model_from(fixture: dict, blocks: list[int]) -> UniverSeg:
    model = UniverSeg(blocks).eval()
    model.load_state_dict({k.removeprefix("weights."): v for k, v in fixture.items() if k.startswith("weights.")},
                          strict=True)
    return model


@pytest.mark.parametrize("name, blocks, cases", [
    ("golden_small", [16] * 4, ["", "case2."]),
    ("golden_small_nonzero_bias", [16] * 4, [""]),
    ("golden_v1_shapes", [64] * 4, [""]),
])
def test_logits_match_reference(name, blocks, cases):
    fixture = load_file(str(FIXTURES / f"{name}.safetensors"))
    model = _model_from(fixture, blocks)
    for prefix in cases:
        with torch.no_grad():
            logits = model(fixture[prefix + "target"], fixture[prefix + "support_images"],
                           fixture[prefix + "support_labels"])
        assert logits.shape == fixture[prefix + "logits"].shape
        assert (logits - fixture[prefix + "logits"]).abs().max().item() <= TOLERANCE
        assert (logits.double() - fixture[prefix + "logits_fp64"]).abs().max().item() <= TOLERANCE


def test_intermediate_activations_match_reference():
    weights = load_file(str(FIXTURES / "golden_small.safetensors"))
    fixture = load_file(str(FIXTURES / "golden_small_intermediates.safetensors"))
    model = _model_from(weights, [16] * 4)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    blocks = ({f"enc{i}": b for i, b in enumerate(model.enc_blocks)}
              | {f"dec{i}": b for i, b in enumerate(model.dec_blocks)})
    for name, block in blocks.items():
        block.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
    model.enc_blocks[0].cross.register_forward_hook(lambda _m, _i, out: seen.__setitem__("enc0_cross", out))
    with torch.no_grad():
        logits = model(fixture["target"], fixture["support_images"], fixture["support_labels"])
    assert (logits - fixture["logits"]).abs().max().item() <= TOLERANCE
    for name, (target, support) in seen.items():
        assert (target - fixture[f"intermediate.{name}.target"]).abs().max().item() <= TOLERANCE, name
        assert (support - fixture[f"intermediate.{name}.support"]).abs().max().item() <= TOLERANCE, name
    assert len(seen) == 8


@pytest.mark.parametrize("config, blocks", [("entries", [64] * 4), ("small_config", [16] * 4)])
def test_state_dict_layout_matches_reference(config, blocks):
    layout = json.loads((FIXTURES / "state_dict_layout.json").read_text())
    entries = layout[config]["entries"] if config == "small_config" else layout["entries"]
    state = UniverSeg(blocks).state_dict()
    assert [(e["key"], e["shape"]) for e in entries] == [(k, list(v.shape)) for k, v in state.items()]
    if config == "entries":
        assert len(state) == layout["num_entries"] == 44
        assert sum(v.numel() for v in state.values()) == layout["total_parameters"]


def test_reference_init_statistics():
    """Kaiming-normal fan-in: gain sqrt(2) per-stream convs, 1 for cross and output convs; zero biases."""
    torch.manual_seed(0)
    model = UniverSeg()
    w = model.enc_blocks[1].target.vmapped.conv.weight
    assert abs(w.std().item() - (2 / (64 * 9)) ** 0.5) < 0.01
    w = model.enc_blocks[1].cross.cross_conv.weight
    assert abs(w.std().item() - (1 / (128 * 9)) ** 0.5) < 0.005
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith("bias"))


def test_rejects_sizes_not_divisible_by_8():
    model = UniverSeg([16] * 4)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 1, 100, 100), torch.rand(1, 2, 1, 100, 100), torch.rand(1, 2, 1, 100, 100))


def test_pt_and_safetensors_load_strictly(tmp_path):
    fixture = load_file(str(FIXTURES / "golden_v1_shapes.safetensors"))
    state = {k.removeprefix("weights."): v for k, v in fixture.items() if k.startswith("weights.")}
    pt = tmp_path / "universeg_v1_nf64_ss64_STA.pt"
    torch.save(state, pt)
    st = tmp_path / "mine.safetensors"
    save_file(state, str(st))
    for path in (pt, st):
        model, card = load_model(path)
        with torch.no_grad():
            logits = model(fixture["target"], fixture["support_images"], fixture["support_labels"])
        assert (logits - fixture["logits"]).abs().max().item() <= TOLERANCE
        assert len(card.sha256) == 64
    official = load_model(pt)[1]
    assert official.research_only and official.notice == RESEARCH_ONLY_NOTICE and "OpenRAIL" in official.licence
    unknown = load_model(st)[1]
    assert not unknown.research_only and unknown.version == "unknown"
    assert "research use only" in unknown.notice  # a renamed official file cannot be ruled out


def test_wrong_checkpoint_names_the_keys(tmp_path):
    state = UniverSeg().state_dict()
    state.pop("out_conv.conv.bias")
    state["extra.weight"] = torch.zeros(1)
    state["enc_blocks.0.cross.cross_conv.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_model(path)
    message = str(err.value)
    assert "missing keys: out_conv.conv.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "enc_blocks.0.cross.cross_conv.bias (3,) (expected (64,))" in message


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": object()}, path)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_model(path)


def test_garbage_files_are_refused(tmp_path):
    for name in ("x.safetensors", "x.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint at all")
        with pytest.raises(WeightsError):
            load_model(tmp_path / name)
    with pytest.raises(WeightsError, match="unsupported weights format"):
        (tmp_path / "x.bin").write_bytes(b"1")
        load_model(tmp_path / "x.bin")
