"""Allocator benchmark: the README's main job with glibc's default malloc settings against
`keep_freed_memory()`, in one process, on the same Segmenter and the same scan.

Every CPU Engine calls `autocontour.engine.runner.keep_freed_memory()`, which stops glibc from
mapping each large tensor afresh (and the kernel from zero-filling its pages on first
touch). Here the runs alternate: "default" first puts glibc's static defaults back
(mmap above 128 KiB, trim above 128 KiB; the dynamic threshold glibc starts with cannot
be restored inside a process), "kept" applies keep_freed_memory again. For each run it
prints the wall time of `Segmenter.segment`, the system CPU time and the minor page
faults; the last line is

    speedup=<default wall / kept wall> fault_ratio=<default faults / kept faults> dice_min=<m>

where dice_min is the lowest Dice between the two settings' masks (they must be equal).

With --train-steps N it times N CPU training steps per run instead (the shipped v2
recipe's shapes: batch 4, support 8, 128 x 128, from the v2 weights), on phantom data
or a prepared --data file, and prints `speedup=<x> fault_ratio=<r>`.

    python bench/allocator.py [--repeats N] [--structures bladder,anorectum,ctvn]
    python bench/allocator.py --train-steps 8 [--data training_data.safetensors]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autocontour.engine.runner import M_MMAP_MAX, M_TRIM_THRESHOLD, keep_freed_memory  # noqa: E402
from autocontour.options import SegmentOptions  # noqa: E402
from autocontour.overlap import dice  # noqa: E402
from autocontour.pipeline import Segmenter  # noqa: E402

M_MMAP_THRESHOLD = -3
GLIBC_DEFAULT_MMAP_MAX = 65536
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def glibc_defaults() -> None:
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)
    mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)


Measurement = tuple[float, float, int]  # seconds, system CPU seconds, minor page faults
SETTINGS = (("default", glibc_defaults), ("kept", keep_freed_memory))


def alternate(run: Callable[[str], Measurement], repeats: int, describe: Callable[[Measurement], str]) -> dict:
    """Each setting `repeats` times, alternating; prints each run and returns each setting's best."""
    results: dict[str, list[Measurement]] = {name: [] for name, _ in SETTINGS}
    for _ in range(repeats):
        for name, apply in SETTINGS:
            apply()
            results[name].append(run(name))
            print(f"{name:<8} {describe(results[name][-1])}", flush=True)
    return {name: min(runs) for name, runs in results.items()}


def ratios(best: dict) -> str:
    return (f"speedup={best['default'][0] / best['kept'][0]:.2f} "
            f"fault_ratio={best['default'][2] / max(1, best['kept'][2]):.1f}")


def timed_run(segmenter: Segmenter, ct: Path, out: Path, structures: str | None) -> Measurement:
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    segmenter.segment(ct, out, SegmentOptions(structures=structures, preview=False))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt


def timed_training(trainer, steps: int) -> Measurement:
    """`steps` more steps of the run; the time is the log's, taken before the closing validation."""
    from autocontour.training.train import LOG

    trainer.config.steps = trainer.step + steps
    before = resource.getrusage(resource.RUSAGE_SELF)
    trainer.run(progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    with open(trainer.out / LOG, newline="") as f:
        seconds = float(list(csv.DictReader(f))[-1]["seconds"])
    return seconds, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt


def trainer_for(data_path: Path | None, out: Path):
    from autocontour.config import Settings
    from autocontour.training.data import phantom_volumes, prepare_training_data
    from autocontour.training.dataset import load_training_data
    from autocontour.training.train import TrainConfig, Trainer

    if data_path is None:
        data_path = prepare_training_data(phantom_volumes(4, seed=5), out / "phantoms.safetensors")
    config = TrainConfig(steps=1, batch_size=4, support_size=8, low_res_steps=0, validate_every=10**6,
                         validation_episodes=2, checkpoint_every=10**6, device="cpu")
    return Trainer(load_training_data(data_path), out / "run", config, init=Settings().default_weights)


def masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0 for p in sorted(out.glob("*.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternating")
    parser.add_argument("--structures", default=None, help="default: every shipped support set")
    parser.add_argument("--ct", type=Path, default=ROOT / "examples" / "pelvis_ct" / "ct.nii.gz")
    parser.add_argument("--train-steps", type=int, default=0, help="time this many training steps per run instead")
    parser.add_argument("--data", type=Path, default=None, help="prepared training data (default: 4 phantoms)")
    args = parser.parse_args()

    if args.train_steps:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = trainer_for(args.data, Path(tmp))
            timed_training(trainer, 1)  # not counted: the run's step-0 validation of the starting weights
            best = alternate(lambda _: timed_training(trainer, args.train_steps), args.repeats,
                             lambda m: f"{m[0] / args.train_steps:5.2f} s a step  system {m[1]:5.1f} s  "
                                       f"minor faults {m[2]:>9}")
        print(ratios(best))
        return

    segmenter = Segmenter()
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name, _ in SETTINGS}
        best = alternate(lambda name: timed_run(segmenter, args.ct, outs[name], args.structures), args.repeats,
                         lambda m: f"wall {m[0]:6.1f} s  system {m[1]:5.1f} s  minor faults {m[2]:>9}")
        default_masks, kept_masks = masks(outs["default"]), masks(outs["kept"])
        dice_min = min(dice(default_masks[k], kept_masks[k]) for k in default_masks)
    print(f"{ratios(best)} dice_min={dice_min:.4f}")

if __name__ == "__main__":
    main()
