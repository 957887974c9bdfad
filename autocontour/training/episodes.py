"""Episodes: one task, one query slice, S support slices of the same task.

In-context models generalise through task diversity (UniverSeg, Sec. 3.3), so
a task here is any of:

- a labelled structure (every label of every training volume), on whole-body
  axial, coronal or sagittal slices, or on axial crops centred on it (as the
  engine's fine pass sees it);
- an HU task (`autocontour.training.hu_tasks`: body, bone, lungs, gas, fat, soft
  tissue, enhanced vessels), which every CT has, labelled or not;
- a union of 2-3 labels;
- a sub-region: the left or right half of a structure;
- a synthetic task: a random smooth shape pasted onto real CT texture with
  its own intensity offset and noise, the same rule for query and supports.

Cross-patient by construction: the supports of an episode all come from one
volume and the query from another. Whenever another patient has the task, that
volume is always another patient's (the `patient` each volume records); only a
task no other patient has takes its supports from another volume of the query's
own patient (a virtual patient is one volume: one draw of
`autocontour.training.randomise`). So the network cannot rely on the query's
own patient; it has to read the rule from someone else's examples, as a
clinic's support set is used. About one
whole-view query in ten is a slice just outside the structure, with an empty
label, so that "nothing here" is an answer (`negative_share`; `negative_reach` bounds how far beyond the
structure's extent it lies, None: anywhere in the volume, where a cross-patient query meets other anatomy
that looks like the examples). Augmentation: per task a flip and
an intensity curve, per slice a small affine and elastic warp and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from autocontour.training.dataset import CROP_PLANE, TrainingData
from autocontour.training.hu_tasks import PREFIX, TASK_BITS

MIN_PIXELS = 12
HU_TASK_SHARE = 0.15  # of episodes: tasks every CT has
CROP_SHARE = 0.25  # of episodes: structure-centred crops
NEGATIVE_SHARE = 0.1  # of whole-view queries: empty slices beyond the structure
NEGATIVE_REACH = 6  # empty queries lie at most this many slice positions beyond the structure


@dataclass
class Task:
    kind: str  # label, union, half, synthetic
    plane: int
    names: tuple[str, ...]
    side: int = 0  # halves: -1 keeps the image-left part, +1 the right part
    query_volume: int = -1
    support_volume: int = -1

    @property
    def title(self) -> str:
        return {"half": f"{'left' if self.side < 0 else 'right'} half of "}.get(self.kind, "") + "+".join(self.names) \
            if self.kind != "synthetic" else "synthetic"


class TaskSampler:
    """Samples episodes; the roles share the code.

    - training (default): structures not held out, slices not held out, all task kinds;
    - `query_slices="heldout"`: labelled tasks of trained structures, queries from held-out slices;
    - `heldout_structures=True`: labelled tasks of the held-out structures only (any slice);
    - `query_volumes`: queries only from these volumes, supports only from the others (held-out virtual
      patients; fine-tuning's held-out case), or only from `support_volumes` when given (a validation split's
      patients, validated among themselves).

    Validation roles (all but training) use whole-view axial slices of labelled structures. Every role takes its
    supports from another patient whenever one has the task, as the benchmark and a clinic do.
    """

    def __init__(self, data: TrainingData, heldout: set[str], seed: int = 0, heldout_structures: bool = False,
                 query_slices: str = "train", query_volumes: set[int] | None = None,
                 negative_share: float = NEGATIVE_SHARE, negative_reach: int | None = NEGATIVE_REACH,
                 support_volumes: set[int] | None = None):
        self.data = data
        self.negative_share = negative_share
        self.negative_reach = negative_reach
        self.rng = np.random.default_rng(seed)
        self.heldout_structures = heldout_structures
        self.query_slices = query_slices
        self.query_volumes = query_volumes
        self.support_volumes = support_volumes
        self.validation = heldout_structures or query_slices == "heldout" or query_volumes is not None
        self.value = [info["names"] for info in data.volumes]  # per volume: name -> label value
        self.patient = [info.get("patient", info["name"]) for info in data.volumes]
        # (task name, plane) -> volume -> the rows showing it
        self.by_task: dict[tuple[str, int], dict[int, np.ndarray]] = {}
        label_counts, bit_counts = data.pixel_counts()
        for v in np.unique(data.volume):
            v = int(v)
            for plane in range(CROP_PLANE + 1):
                rows = np.nonzero((data.volume == v) & (data.plane == plane))[0]
                if rows.size == 0:
                    continue
                for name, value in self.value[v].items():
                    if (name in heldout) != heldout_structures or value > 255:
                        continue
                    shown = rows[label_counts[rows, value] >= MIN_PIXELS]
                    if plane == CROP_PLANE:
                        shown = shown[data.crop_of[shown] == value]
                    self._add((name, plane), v, shown)
                if not self.validation and plane != CROP_PLANE:
                    for bit, name in enumerate(TASK_BITS):
                        self._add((PREFIX + name, plane), v, rows[bit_counts[rows, bit] >= MIN_PIXELS])
        enough = {k for k, by_volume in self.by_task.items() if sum(r.size for r in by_volume.values()) >= 6}
        if self.validation:
            enough = {k for k in enough if k[1] == 0}
        if query_volumes is not None:  # tasks a query volume has (the others would only be drawn and skipped)
            enough = {k for k in enough if not query_volumes.isdisjoint(self.by_task[k])}
        self.keys = {"label": sorted(k for k in enough if not k[0].startswith(PREFIX) and k[1] != CROP_PLANE),
                     "hu": sorted(k for k in enough if k[0].startswith(PREFIX)),
                     "crop": sorted(k for k in enough if k[1] == CROP_PLANE)}
        if not self.keys["label"]:
            raise ValueError("no task has enough labelled slices")

    def _add(self, key: tuple[str, int], volume: int, rows: np.ndarray) -> None:
        if rows.size:
            self.by_task.setdefault(key, {})[volume] = rows

    def _key(self) -> tuple[str, int]:
        r = self.rng.random()
        group = ("hu" if r < HU_TASK_SHARE else "crop" if r < HU_TASK_SHARE + CROP_SHARE else "label")
        keys = self.keys[group] or self.keys["label"]
        return keys[self.rng.integers(len(keys))]

    def sample_task(self) -> Task:
        name, plane = self._key()
        r = self.rng.random()
        if self.validation or name.startswith(PREFIX) or r < 0.6:
            return Task("label", plane, (name,))
        if r < 0.75:
            volume = int(self.rng.choice(list(self.by_task[(name, plane)])))
            others = [k[0] for k in self.by_task if k[1] == plane and k[0] != name and not k[0].startswith(PREFIX)
                      and volume in self.by_task[k]]
            count = min(len(others), int(self.rng.integers(1, 3)))
            extra = [str(x) for x in self.rng.choice(others, size=count, replace=False)] if count else []
            return Task("union", plane, (name, *extra), query_volume=volume)
        if r < 0.85:
            return Task("half", plane, (name,), side=int(self.rng.choice([-1, 1])))
        return Task("synthetic", plane, (name,))

    def rows_in(self, task: Task, volume: int) -> np.ndarray:
        """The task's candidate slices in one volume (empty where the volume lacks any of its names)."""
        if task.kind == "synthetic":
            rows = np.nonzero((self.data.volume == volume) & (self.data.plane == task.plane))[0]
            return rows if task.plane != CROP_PLANE else rows[self.data.crop_of[rows] > 0]
        parts = [self.by_task.get((n, task.plane), {}).get(volume) for n in task.names]
        shown = [p for p in parts if p is not None]
        if len(shown) < len(parts):
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(shown))

    def task_label(self, task: Task, rows: np.ndarray) -> np.ndarray:
        labels = np.zeros(self.data.labels[rows].shape, dtype=np.float32)
        for i, row in enumerate(rows):
            names = self.value[self.data.volume[row]]
            for n in task.names:
                if n.startswith(PREFIX):
                    labels[i] += (self.data.hu_bits[row] & TASK_BITS[n.removeprefix(PREFIX)]) > 0
                elif n in names:
                    labels[i] += self.data.labels[row] == names[n]
        labels = np.minimum(labels, 1.0)
        if task.kind == "half":
            columns = np.arange(labels.shape[2])
            for i in range(len(rows)):
                cols = np.nonzero(labels[i].any(axis=0))[0]
                if cols.size:
                    mid = (cols.min() + cols.max()) / 2
                    labels[i] *= ((columns <= mid) if task.side < 0 else (columns > mid))[None, :]
        return labels

    def _query_slices(self, task: Task, volume: int) -> np.ndarray:
        rows = self.rows_in(task, volume)
        held = self.data.heldout[rows]
        if self.query_slices == "heldout":
            return rows[held]
        return rows if self.heldout_structures or self.query_volumes is not None else rows[~held]

    def may_support(self, volume: int) -> bool:
        """Whether the role lets this volume give supports (not a held-out query volume; one of `support_volumes`)."""
        if self.support_volumes is not None:
            return volume in self.support_volumes
        return self.query_volumes is None or volume not in self.query_volumes

    def _support_volume(self, task: Task, query_volume: int, support_size: int) -> tuple[int, np.ndarray]:
        """Another patient's volume with enough of the task's slices whenever another patient has the task at
        all; another volume of the query's patient only where no other patient has it; the query's own only where
        no other volume has it; none (-1) when the allowed volumes have too few slices."""
        candidates = [int(v) for v in (np.unique(self.data.volume) if task.kind == "synthetic"
                                       else {v for n in task.names[:1] for v in self.by_task[(n, task.plane)]})
                      if int(v) != query_volume and self.may_support(int(v))]
        others = [v for v in candidates
                  if self.patient[v] != self.patient[query_volume] and self.rows_in(task, v).size]
        order = [int(v) for v in self.rng.permutation(others or candidates)]
        for v in order:
            rows = self._support_slices(self.rows_in(task, v))
            if rows.size >= support_size:
                return v, rows
        if order or self.query_volumes is not None:
            return -1, np.zeros(0, dtype=np.int64)
        return query_volume, self._support_slices(self.rows_in(task, query_volume))

    def _support_slices(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.heldout_structures or self.query_volumes is not None else rows[~self.data.heldout[rows]]

    def episode(self, support_size: int):
        """(query image, query label, support images, support labels, task) as float32 arrays; the task says
        which volume the query and the supports came from."""
        for _ in range(100):
            task = self.sample_task()
            if task.query_volume < 0:
                volumes = (np.unique(self.data.volume) if task.kind == "synthetic"
                           else np.array(list(self.by_task[(task.names[0], task.plane)])))
                if self.query_volumes is not None:
                    volumes = volumes[np.isin(volumes, list(self.query_volumes))]
                if volumes.size == 0:
                    continue
                task.query_volume = int(self.rng.choice(volumes))
            queries = self._query_slices(task, task.query_volume)
            if queries.size == 0:
                continue
            q = int(self.rng.choice(queries))
            if (not self.validation and task.kind != "synthetic" and task.plane != CROP_PLANE
                    and self.rng.random() < self.negative_share):
                negative = self._negative_query(task, task.query_volume)
                q = negative if negative is not None else q
            task.support_volume, supports = self._support_volume(task, task.query_volume, support_size)
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
        """A training slice of the volume beyond the task's extent, within `negative_reach` positions of it
        (anywhere if None); its label is empty."""
        rows = np.nonzero((self.data.volume == volume) & (self.data.plane == task.plane) & ~self.data.heldout)[0]
        present = np.isin(rows, self.rows_in(task, volume))
        if not present.any():
            return None
        positions = self.data.position[rows]
        lo, hi = positions[present].min(), positions[present].max()
        reach = np.inf if self.negative_reach is None else self.negative_reach
        near = rows[~present & (((positions < lo) & (positions >= lo - reach))
                                | ((positions > hi) & (positions <= hi + reach)))]
        if near.size == 0:
            return None
        candidate = int(self.rng.choice(near))
        return candidate if not self.task_label(task, np.array([candidate])).any() else None

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
