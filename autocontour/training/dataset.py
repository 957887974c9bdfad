"""The prepared training data, loaded without SimpleITK (a GPU machine may not have it).

See `autocontour.training.data` for how the file is made and what it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

CROP_PLANE = 3  # `plane` of an axial structure-centred crop (0-2: whole-view axial, coronal, sagittal)


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
    hu_bits: np.ndarray  # the HU tasks, one bit each (`autocontour.training.hu_tasks.TASK_BITS`)
    crop_of: np.ndarray  # a crop's centre structure (label value), 0 for whole views

    def pixel_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per slice: pixels of each label value (N, 256) and of each HU task bit (N, 8); computed once."""
        if not hasattr(self, "_counts"):
            n = len(self.labels)
            labels = np.zeros((n, 256), dtype=np.int32)
            bits = np.zeros((n, 8), dtype=np.int32)
            for start in range(0, n, 512):
                chunk = self.labels[start:start + 512].reshape(-1, self.labels[0].size).astype(np.int64)
                offsets = chunk + 256 * np.arange(len(chunk))[:, None]
                histogram = np.bincount(offsets.ravel(), minlength=256 * len(chunk))
                labels[start:start + len(chunk)] = histogram.reshape(-1, 256)
                hu = self.hu_bits[start:start + 512].reshape(len(chunk), -1)
                bits[start:start + len(chunk)] = ((hu[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1).sum(axis=1)
            self._counts = (labels, bits)
        return self._counts

    def subset(self, keep: np.ndarray) -> TrainingData:
        """The rows where `keep` is true (volume indices, and so the metadata, unchanged)."""
        return TrainingData(self.images[keep], self.labels[keep], self.volume[keep], self.plane[keep],
                            self.position[keep], self.heldout[keep], self.volumes, self.preprocessing,
                            self.hu_bits[keep], self.crop_of[keep])


def load_training_data(path: Path) -> TrainingData:
    """Files written before the HU tasks and crops (no hu_bits, crop_of) load with neither."""
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    t = load_file(str(path))
    empty = np.zeros(t["labels"].shape, dtype=np.uint8)
    return TrainingData(t["images"], t["labels"], t["volume"], t["plane"], t["position"], t["heldout"],
                        json.loads(meta["volumes"]), json.loads(meta["preprocessing"]),
                        t.get("hu_bits", empty), t.get("crop_of", np.zeros(len(t["plane"]), dtype=np.uint8)))
