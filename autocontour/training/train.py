"""Episodic in-context training and fine-tuning of UniverSeg.

`train` learns from scratch (or continues) on many tasks; `finetune` starts
from any compatible checkpoint (the official one included) and adapts it to a
clinic's own labelled cases, stopping early when a held-out case stops
improving. That is the source document's transfer-learning path.

Both share one loop: sample B episodes, augment, run the split network
(identical to the plain forward, about 3x cheaper), loss = soft Dice + BCE on
the logits, Adam with warm-up and cosine decay, bf16 autocast on CUDA and
float32 on CPU. Checkpoints hold everything needed to resume the run exactly
(model, optimiser, step, random states); validation runs at intervals on a
fixed set of episodes; the log is a CSV plus a PNG of the curves.
"""

from __future__ import annotations

import csv
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tqdm import tqdm

from autocontour.engine.network import SplitUniverSeg
from autocontour.engine.runner import keep_freed_memory, resolve_device
from autocontour.model import UniverSeg
from autocontour.model.weights import ModelCard, load_model, save_checkpoint
from autocontour.overlap import dice
from autocontour.training.dataset import TrainingData, load_training_data
from autocontour.training.episodes import NEGATIVE_REACH, NEGATIVE_SHARE, TaskSampler, augment

HELD_OUT_ROLES = ("validation", "validation_split")  # volumes validated on, never trained on
CHECKPOINT = "checkpoint.pt"
LOG = "training_log.csv"
CURVES = "curves.png"


class TrainConfig(BaseModel):
    """Everything that determines a run; saved with its checkpoints."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(4, ge=1)
    support_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    low_res_steps: int = Field(0, ge=0, description="first steps at low_res_size, a cheap curriculum for CPUs")
    low_res_size: int = Field(64, ge=16)
    encoder_blocks: list[int] = [64, 64, 64, 64]
    heldout_structures: list[str] = []
    validate_every: int = Field(200, ge=1)
    validation_episodes: int = Field(32, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    patience: int | None = Field(None, description="stop after this many validations without improvement")
    max_seconds: float | None = Field(None, gt=0, description="stop after this much training time (a time budget)")
    negative_share: float = Field(NEGATIVE_SHARE, ge=0, le=1, description="whole-view queries that are empty slices")
    negative_reach: int | None = Field(NEGATIVE_REACH, ge=1, description="how many slice positions beyond the "
                                       "structure an empty query lies at most; None: anywhere in the volume")
    seed: int = 0
    device: str = "auto"


def soft_dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (per image, smoothed) plus binary cross-entropy, both on the logits."""
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def _batch(sampler: TaskSampler, batch_size: int,
           support_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    episodes = [sampler.episode(support_size) for _ in range(batch_size)]
    q = torch.from_numpy(np.stack([e[0] for e in episodes]))[:, None]
    ql = torch.from_numpy(np.stack([e[1] for e in episodes]))[:, None]
    si = torch.from_numpy(np.stack([e[2] for e in episodes]))[:, :, None]
    sl = torch.from_numpy(np.stack([e[3] for e in episodes]))[:, :, None]
    return q, ql, si, sl


def _resize(q, ql, si, sl, size: int):
    if q.shape[-1] == size:
        return q, ql, si, sl
    b, s = si.shape[:2]

    def images(x):
        return F.interpolate(x, size=(size, size), mode="area")

    def labels(x):
        return (F.interpolate(x, size=(size, size), mode="area") > 0.5).float()

    return (images(q), labels(ql), images(si.flatten(0, 1)).unflatten(0, (b, s)),
            labels(sl.flatten(0, 1)).unflatten(0, (b, s)))


class Trainer:
    """One training or fine-tuning run in an output folder (resumable)."""

    def __init__(self, data: TrainingData, out: Path, config: TrainConfig, init: Path | None = None,
                 query_volumes: set[int] | None = None, card: dict | None = None):
        self.data, self.out, self.config = data, Path(out), config
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # a CPU step was 1.17x slower with every freed tensor unmapped (bench/allocator.py)
        torch.manual_seed(config.seed)
        self.init_card: ModelCard | None
        if init is not None:
            self.model, self.init_card = load_model(init)
        else:
            self.model, self.init_card = UniverSeg(config.encoder_blocks), None
        self.model.to(self.device).train()
        self.net = SplitUniverSeg(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        heldout = set(config.heldout_structures)
        # held-out virtual patients, a validation split's patients, or fine-tuning's held-out case, are validated on
        # and never trained on
        if query_volumes is None:
            query_volumes = {i for i, v in enumerate(data.volumes) if v.get("role") in HELD_OUT_ROLES} or None
        train_data = data if query_volumes is None else data.subset(~np.isin(data.volume, list(query_volumes)))
        self.sampler = TaskSampler(train_data, heldout, seed=config.seed, negative_share=config.negative_share,
                                   negative_reach=config.negative_reach)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.validation = self._validation_sets(heldout, query_volumes)
        self.step = 0
        self.best = -1.0
        self.stale = 0
        self.card_extra = card or {}

    def _validation_sets(self, heldout: set[str], query_volumes: set[int] | None) -> dict[str, list]:
        """Fixed episodes, sampled once, so every validation compares like with like."""
        sets: dict[str, list] = {}
        for name, kwargs in self._validation_roles(heldout, query_volumes).items():
            sampler = TaskSampler(self.data, heldout, seed=10_000 + self.config.seed, **kwargs)
            sets[name] = [sampler.episode(self.config.support_size) for _ in range(self.config.validation_episodes)]
        return sets

    def _validation_roles(self, heldout: set[str], query_volumes: set[int] | None) -> dict[str, dict[str, Any]]:
        """Which validations a run has: held-out slices of trained volumes (when no volume is held out); held-out
        virtual patients with supports from the trained volumes; a validation split's patients with supports
        from each other; fine-tuning's held-out case; and the held-out structures."""
        role = [v.get("role", "train") for v in self.data.volumes]
        virtual = {i for i, r in enumerate(role) if r == "validation"}
        split = {i for i, r in enumerate(role) if r == "validation_split"}
        roles: dict[str, dict[str, Any]] = {}
        if query_volumes is None:
            roles["seen_structures_heldout_slices"] = dict(query_slices="heldout")
        elif not virtual and not split:
            roles["heldout_case"] = dict(query_volumes=query_volumes)
        trained = set(range(len(role))) - (query_volumes or set())
        if virtual:
            roles["heldout_virtual_patients"] = dict(query_volumes=virtual, support_volumes=trained)
        if split:
            roles["validation_patients"] = dict(query_volumes=split, support_volumes=split)
        if heldout and (virtual or split or query_volumes is None):
            roles["heldout_structures"] = dict(heldout_structures=True)
        return roles

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()

    def learning_rate(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        scores = {}
        for name, episodes in self.validation.items():
            dices = []
            for start in range(0, len(episodes), 8):
                chunk = episodes[start:start + 8]
                q = torch.from_numpy(np.stack([e[0] for e in chunk]))[:, None].to(self.device)
                si = torch.from_numpy(np.stack([e[2] for e in chunk]))[:, :, None].to(self.device)
                sl = torch.from_numpy(np.stack([e[3] for e in chunk]))[:, :, None].to(self.device)
                with self._autocast():
                    pred = self.net(q, si, sl).float() > 0
                target = torch.from_numpy(np.stack([e[1] for e in chunk])).to(self.device) > 0.5
                dices += [dice(p, t) for p, t in zip(pred[:, 0].cpu().numpy(), target.cpu().numpy(), strict=True)]
            scores[f"val_dice_{name}"] = float(np.mean(dices))
        self.model.train()
        return scores

    def save(self, path: Path | None = None) -> None:
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "best": self.best, "stale": self.stale, "config": self.config.model_dump_json(),
            "sampler_rng": json.dumps(self.sampler.rng.bit_generator.state), "torch_rng": self.generator.get_state(),
        }
        tmp = (path or self.out / CHECKPOINT).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path or self.out / CHECKPOINT)

    def resume(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        saved = TrainConfig.model_validate_json(state["config"])
        if saved.encoder_blocks != self.config.encoder_blocks:
            raise ValueError("the checkpoint in the output folder has another network width")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best, self.stale = state["step"], state["best"], state["stale"]
        self.sampler.rng.bit_generator.state = json.loads(state["sampler_rng"])
        self.generator.set_state(state["torch_rng"])
        return True

    def run(self, progress: bool = True) -> dict:
        """Train until `config.steps` (or early stop); returns the final validation scores."""
        c = self.config
        log_path = self.out / LOG
        new_log = not log_path.is_file() or self.step == 0
        with open(log_path, "w" if new_log else "a", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            names = ["step", "loss", "lr", "size", "seconds"] + [f"val_dice_{n}" for n in self.validation]
            if new_log:
                writer.writerow(names)
            bar = tqdm(total=c.steps, initial=self.step, desc="train", unit="step", disable=not progress)
            started, running = time.perf_counter(), []
            scores = self._starting_scores(writer, names)
            while self.step < c.steps:
                size, loss = self._train_step()
                running.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running[-50:]):.3f}")
                row = {"step": self.step, "loss": round(loss, 5),
                       "lr": f"{self.learning_rate(self.step - 1):.2e}",
                       "size": size, "seconds": round(time.perf_counter() - started, 1)}
                if self.step % c.validate_every == 0 or self.step == c.steps:
                    scores = self._validate_and_keep_best()
                    row |= {k: round(v, 4) for k, v in scores.items()}
                writer.writerow([row.get(n, "") for n in names])
                f.flush()
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save()
                if (stop := self._stop_reason(started)) is not None:
                    bar.write(stop)
                    break
            bar.close()
        self.save()
        plot_curves(log_path, self.out / CURVES)
        return scores or self.validate()

    def _starting_scores(self, writer, names: list[str]) -> dict[str, float]:
        """When fine-tuning from step 0: the starting weights on the same episodes, what the run has to beat
        (step 0 of the log, and the first best.safetensors); otherwise none."""
        if self.step != 0 or self.init_card is None:
            return {}
        scores = self.validate()
        self.best = float(np.mean(list(scores.values())))
        self.export(self.out / "best.safetensors", scores)
        writer.writerow([{"step": 0, **{k: round(v, 4) for k, v in scores.items()}}.get(n, "") for n in names])
        return scores

    def _train_step(self) -> tuple[int, float]:
        """One optimiser step on a fresh batch (at low resolution for the first steps); returns the image size
        and the loss."""
        c = self.config
        size = c.low_res_size if self.step < c.low_res_steps else self.data.images.shape[-1]
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        batch = augment(*_batch(self.sampler, c.batch_size, c.support_size), self.generator)
        q, ql, si, sl = (t.to(self.device) for t in _resize(*batch, size))
        with self._autocast():
            logits = self.net(q, si, sl)
        loss = soft_dice_bce(logits.float(), ql)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return size, loss.item()

    def _validate_and_keep_best(self) -> dict[str, float]:
        """The validation scores; a better mean than before becomes best.safetensors, a worse one counts
        towards early stopping."""
        scores = self.validate()
        target = float(np.mean(list(scores.values())))
        if target > self.best:
            self.best, self.stale = target, 0
            self.export(self.out / "best.safetensors", scores)
        else:
            self.stale += 1
        return scores

    def _stop_reason(self, started: float) -> str | None:
        """Why to stop before `config.steps` (no improvement for `patience` validations, or the time budget
        spent), or None."""
        c = self.config
        if c.patience is not None and self.stale >= c.patience:
            return f"early stop at step {self.step}: no improvement in {c.patience} validations"
        if c.max_seconds is not None and time.perf_counter() - started > c.max_seconds:
            return f"time budget of {c.max_seconds:.0f} s reached at step {self.step}"
        return None

    def export(self, path: Path, scores: dict[str, float]) -> str:
        """The weights as a project checkpoint with its model card."""
        init_card = self.init_card if self.init_card and self.init_card.research_only else None
        research_only = init_card is not None
        licence = self.card_extra.get("licence", "not stated: weights follow the licences of their training data")
        if init_card is not None:  # derived from research-only weights: that restriction is inherited
            licence = f"{init_card.licence} (derived from {init_card.name}; research use only)"
        card = ModelCard(
            name=self.card_extra.get("name", f"autocontour-{self.out.resolve().name}"),
            version=self.card_extra.get("version", f"step {self.step}"),
            sha256="", licence=licence,
            source=self.card_extra.get("source", "autocontour train"),
            encoder_blocks=self.model.encoder_blocks,
            research_only=research_only,
            notice=init_card.notice if init_card is not None else None,
            description=json.dumps({"step": self.step, "validation": scores, **self.card_extra.get("details", {})}),
        )
        return save_checkpoint(self.model, path, card)


def plot_curves(log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log) as f:
        rows = list(csv.DictReader(f))
    trained = [r for r in rows if r["loss"]]  # step 0 (the starting weights) has a validation and no loss
    if not trained:
        return
    steps = np.array([int(r["step"]) for r in trained])
    loss = np.array([float(r["loss"]) for r in trained])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, len(loss) // 50)
    a.plot(steps, loss, alpha=0.25, color="grey")
    a.plot(steps[window - 1:], np.convolve(loss, np.ones(window) / window, mode="valid"), color="black")
    a.set_xlabel("step")
    a.set_ylabel("training loss (soft Dice + BCE)")
    for key in [k for k in rows[0] if k.startswith("val_dice_")]:
        points = [(int(r["step"]), float(r[key])) for r in rows if r[key]]
        if points:
            b.plot(*zip(*points, strict=True), marker="o", label=key.removeprefix("val_dice_").replace("_", " "))
    b.set_xlabel("step")
    b.set_ylabel("validation Dice")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def train(data_path: Path, out: Path, config: TrainConfig, init: Path | None = None, resume: bool = True,
          progress: bool = True, card: dict | None = None) -> dict:
    """Train on a prepared data file; resumes from out/checkpoint.pt when present."""
    trainer = Trainer(load_training_data(data_path), out, config, init=init, card=card)
    if resume:
        trainer.resume()
    (Path(out) / "config.json").write_text(config.model_dump_json(indent=1))
    scores = trainer.run(progress)
    trainer.export(Path(out) / "final.safetensors", scores)
    return scores
