"""The prepared training data, loaded without SimpleITK (a GPU machine may not have it).

See `app.training.data` for how the file is made and what it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


@dataclass
class TrainingData:
    images: np.ndarray
    labels: np.ndarray
    volume: np.ndarray
    plane: np.ndarray
    position: np.ndarray
    heldout: np.ndarray
    volumes: list[dict]
    preprocessing: dict  # the PreprocessSpec the slices were made with


def load_training_data(path: Path) -> TrainingData:
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    t = load_file(str(path))
    return TrainingData(t["images"], t["labels"], t["volume"], t["plane"], t["position"], t["heldout"],
                        json.loads(meta["volumes"]), json.loads(meta["preprocessing"]))
