"""Shared fixtures: real example data, phantoms, small fixed weights, support sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from autocontour.model import UniverSeg
from autocontour.model.weights import ModelCard, save_checkpoint
from autocontour.phantom import save_phantom
from autocontour.support.build import build_support_set
from autocontour.support.recipes import load_recipes

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
EXAMPLE_CT = ROOT / "examples" / "pelvis_ct" / "ct.nii.gz"
EXAMPLE_LABELS = ROOT / "examples" / "pelvis_ct" / "labels.nii.gz"
RECIPES = ROOT / "support_sets" / "recipes"


def write_phantom(folder: Path, seed: int, **kwargs) -> tuple[Path, Path]:
    """A phantom CT and its label map (+ labels.json) as NIfTI files."""
    return save_phantom(folder, seed, **kwargs)


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory) -> Path:
    """A fixed (seeded) small UniverSeg, saved the way project checkpoints are."""
    torch.manual_seed(1234)
    model = UniverSeg([16, 16, 16, 16])
    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_checkpoint(model, path, ModelCard(name="test-small", version="0", sha256="", licence="test only",
                                           source="seeded random init", encoder_blocks=[16, 16, 16, 16]))
    return path


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory) -> list[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("phantoms")
    return [write_phantom(root / f"case{seed}", seed) for seed in (11, 12)]


@pytest.fixture(scope="session")
def phantom_support_dir(tmp_path_factory, phantom_cases) -> Path:
    """bladder, anorectum and ctvn support sets built from two phantoms with the shipped recipes."""
    root = tmp_path_factory.mktemp("support")
    recipes = load_recipes(RECIPES)
    for name in ("bladder", "anorectum", "ctvn"):
        build_support_set(name, name, phantom_cases, root / name, size=16, recipe=recipes[name], preview=False,
                          symmetric=True)
    return root


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the browser tests save their screenshots: AUTOCONTOUR_SCREENSHOTS (the docs' pictures) or a temp folder."""
    folder = Path(os.environ.get("AUTOCONTOUR_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
