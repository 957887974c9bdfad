"""Episodes: one task, one query slice, S support slices of the same task.

In-context models generalise through task diversity (UniverSeg, Sec. 3.3), so
a task here is any of:

- a labelled structure (every label of every training volume);
- a union of 2-3 labels of one volume;
- a sub-region: the left or right half of a structure;
- a synthetic task: a random smooth shape pasted onto real CT texture with
  its own intensity offset and noise, the same rule for query and supports;

on axial, coronal or sagittal slices. About one query in ten is a slice just
outside the structure, with an empty label, so the network learns that
"nothing here" is an answer. The query is never one of its supports.
Augmentation: per task a flip and an intensity curve, per slice a small
affine and elastic warp and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from app.training.dataset import TrainingData

MIN_PIXELS = 12


@dataclass
class Task:
    kind: str  # label, union, half, synthetic
    plane: int
    names: tuple[str, ...]
    volume: int = -1  # synthetic tasks and unions live in one volume
    side: int = 0  # halves: -1 keeps the image-left part, +1 the right part

    @property
    def title(self) -> str:
        return {"half": f"{'left' if self.side < 0 else 'right'} half of "}.get(self.kind, "") + "+".join(self.names) \
            if self.kind != "synthetic" else "synthetic"


class TaskSampler:
    """Samples episodes; the roles share the code.

    - training (default): structures not held out, slices not held out, all task kinds;
      supports come from the query's volume or, when another volume has the
      structure too, from any of them (support from other patients, as in use);
    - `query_slices="heldout"`: labelled tasks of trained structures, queries from held-out slices;
    - `heldout_structures=True`: labelled tasks of the held-out structures only (any slice);
    - `query_volumes`: queries only from these volumes, supports only from the others
      (fine-tuning's early stopping on a held-out case).
    """

    def __init__(self, data: TrainingData, heldout: set[str], seed: int = 0, heldout_structures: bool = False,
                 query_slices: str = "train", query_volumes: set[int] | None = None):
        self.data = data
        self.rng = np.random.default_rng(seed)
        self.heldout_structures = heldout_structures
        self.query_slices = query_slices
        self.query_volumes = query_volumes
        self.labels_only = heldout_structures or query_slices == "heldout" or query_volumes is not None
        self.value = [info["names"] for info in data.volumes]  # per volume: name -> label value
        self.by_task: dict[tuple[str, int], np.ndarray] = {}  # (name, plane) -> slices showing it, all volumes
        for v, names in enumerate(self.value):
            for plane in range(3):
                rows = np.nonzero((data.volume == v) & (data.plane == plane))[0]
                for name, value in names.items():
                    if (name in heldout) != heldout_structures or rows.size == 0:
                        continue
                    counts = (data.labels[rows] == value).reshape(len(rows), -1).sum(axis=1)
                    usable = rows[counts >= MIN_PIXELS]
                    if usable.size:
                        key = (name, plane)
                        self.by_task[key] = np.concatenate([self.by_task.get(key, usable[:0]), usable])
        self.keys = [k for k, rows in self.by_task.items() if rows.size >= 6 and not (self.labels_only and k[1] != 0)]
        if not self.keys:
            raise ValueError("no task has enough labelled slices")

    def sample_task(self) -> Task:
        r = self.rng.random()
        name, plane = self.keys[self.rng.integers(len(self.keys))]
        if self.labels_only or r < 0.55:
            return Task("label", plane, (name,))
        volume = int(self.rng.choice(np.unique(self.data.volume[self.by_task[(name, plane)]])))
        if r < 0.7:
            others = [k[0] for k in self.keys if k[1] == plane and k[0] != name and k[0] in self.value[volume]]
            count = min(len(others), int(self.rng.integers(1, 3)))
            extra = [str(x) for x in self.rng.choice(others, size=count, replace=False)] if count else []
            return Task("union", plane, (name, *extra), volume=volume)
        if r < 0.8:
            return Task("half", plane, (name,), side=int(self.rng.choice([-1, 1])))
        return Task("synthetic", plane, (), volume=volume)

    def task_rows(self, task: Task) -> np.ndarray:
        if task.kind == "synthetic":
            return np.nonzero((self.data.volume == task.volume) & (self.data.plane == task.plane))[0]
        rows = np.unique(np.concatenate([self.by_task[(n, task.plane)] for n in task.names
                                         if (n, task.plane) in self.by_task]))
        return rows[self.data.volume[rows] == task.volume] if task.volume >= 0 else rows

    def task_label(self, task: Task, rows: np.ndarray) -> np.ndarray:
        labels = np.zeros(self.data.labels[rows].shape, dtype=np.float32)
        for i, row in enumerate(rows):
            names = self.value[self.data.volume[row]]
            values = [names[n] for n in task.names if n in names]
            labels[i] = np.isin(self.data.labels[row], values)
        if task.kind == "half":
            columns = np.arange(labels.shape[2])
            for i in range(len(rows)):
                cols = np.nonzero(labels[i].any(axis=0))[0]
                if cols.size:
                    mid = (cols.min() + cols.max()) / 2
                    labels[i] *= ((columns <= mid) if task.side < 0 else (columns > mid))[None, :]
        return labels

    def _split(self, task: Task, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate query rows and support rows for a task, by role."""
        held = self.data.heldout[rows]
        if self.query_volumes is not None:
            in_query = np.isin(self.data.volume[rows], list(self.query_volumes))
            return rows[in_query], rows[~in_query]
        if self.heldout_structures:
            return rows, rows
        if self.query_slices == "heldout":
            return rows[held], rows[~held]
        return rows[~held], rows[~held]

    def episode(self, support_size: int):
        """(query image, query label, support images, support labels, task) as float32 arrays."""
        for _ in range(100):
            task = self.sample_task()
            rows = self.task_rows(task)
            queries, supports = self._split(task, rows)
            if queries.size == 0:
                continue
            q = int(self.rng.choice(queries))
            same_volume = self.data.volume[supports] == self.data.volume[q]
            if self.query_volumes is None and self.rng.random() < 0.5 and same_volume.sum() > support_size:
                supports = supports[same_volume]
            if not self.labels_only and task.kind != "synthetic" and self.rng.random() < 0.1:
                negative = self._negative_query(task, int(self.data.volume[q]))
                q = negative if negative is not None else q
            supports = supports[supports != q]
            if supports.size < support_size:
                continue
            chosen = np.concatenate([[q], self.rng.choice(supports, size=support_size, replace=False)])
            images = self.data.images[chosen].astype(np.float32)
            if task.kind == "synthetic":
                images, labels = self._synthetic(images)
            else:
                labels = self.task_label(task, chosen)
                if labels[1:].reshape(support_size, -1).sum(axis=1).min() < 1:
                    continue
            return images[0], labels[0], images[1:], labels[1:], task
        raise RuntimeError("could not sample an episode")

    def _negative_query(self, task: Task, volume: int) -> int | None:
        """A training slice of the volume just beyond the task's extent (its label is empty)."""
        rows = np.nonzero((self.data.volume == volume) & (self.data.plane == task.plane) & ~self.data.heldout)[0]
        values = [self.value[volume][n] for n in task.names if n in self.value[volume]]
        present = np.isin(self.data.labels[rows], values).reshape(len(rows), -1).any(axis=1)
        if not present.any():
            return None
        positions = self.data.position[rows]
        lo, hi = positions[present].min(), positions[present].max()
        near = rows[~present & (((positions < lo) & (positions >= lo - 6))
                                | ((positions > hi) & (positions <= hi + 6)))]
        return int(self.rng.choice(near)) if near.size else None

    def _synthetic(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Random smooth shapes with a task-specific intensity offset and texture on real CT slices."""
        offset = float(self.rng.choice([-1, 1]) * self.rng.uniform(0.08, 0.3))
        texture = float(self.rng.uniform(0.0, 0.08))
        scale = float(self.rng.uniform(4, 12))
        threshold = float(self.rng.uniform(0.8, 1.6))
        labels = np.zeros_like(images)
        out = images.copy()
        h, w = images.shape[1:]
        for i in range(images.shape[0]):
            field = ndimage.gaussian_filter(self.rng.normal(size=(h, w)), scale)
            field /= field.std() + 1e-8
            shape = field > threshold
            shape = ndimage.binary_opening(shape, iterations=1)
            labels[i] = shape
            out[i] = np.clip(out[i] + shape * (offset + texture * self.rng.normal(size=(h, w))), 0, 1)
        return out.astype(np.float32), labels


def augment(query: torch.Tensor, query_label: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-level flip and intensity curve, per-slice affine + elastic warp and noise.

    Shapes: query (B, 1, H, W), images (B, S, 1, H, W), labels alike.
    """
    b, s = images.shape[:2]
    x = torch.cat([query.unsqueeze(1), images], dim=1)  # (B, S+1, 1, H, W)
    y = torch.cat([query_label.unsqueeze(1), labels], dim=1)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    flip_lr = rand(b) < 0.5
    x[flip_lr], y[flip_lr] = x[flip_lr].flip(-1), y[flip_lr].flip(-1)
    flip_ud = rand(b) < 0.2
    x[flip_ud], y[flip_ud] = x[flip_ud].flip(-2), y[flip_ud].flip(-2)
    gamma = torch.exp((rand(b, 1, 1, 1, 1) - 0.5) * 0.6)
    x = x.clamp(0, 1) ** gamma

    n = b * (s + 1)
    angle = (rand(n) - 0.5) * (np.pi / 9)  # +-10 degrees
    scale = 1 + (rand(n) - 0.5) * 0.2
    shift = (rand(n, 2) - 0.5) * 0.12
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) / scale
    theta[:, 0, 1] = -torch.sin(angle) / scale
    theta[:, 1, 0] = torch.sin(angle) / scale
    theta[:, 1, 1] = torch.cos(angle) / scale
    theta[:, :, 2] = shift
    h, w = x.shape[-2:]
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    coarse = (rand(n, 2, 5, 5) - 0.5) * 0.06  # elastic: smooth random displacement
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(x.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = (x + torch.randn(x.shape, generator=generator) * rand(n, 1, 1, 1) * 0.03).clamp(0, 1)
    y = (y > 0.5).float()
    x, y = x.unflatten(0, (b, s + 1)), y.unflatten(0, (b, s + 1))
    return x[:, 0], y[:, 0], x[:, 1:], y[:, 1:]
