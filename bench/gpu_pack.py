"""Shrink a prepared training-data file to carry it to a GPU machine, and restore it there.

The device tool carries at most 64 MiB with the working tree, and a prepared OpenKBP patient takes about
13 MB (float16 images of 128 x 128). The images are windowed to [0, 1], so 8 bits keep them to 1/510 of the
window (the network sees nothing finer after bf16), and xz packs what is left to about 0.85 MB a patient.

    python bench/gpu_pack.py pack runs/training_data.safetensors .gpu/training_data.safetensors.xz
    python bench/gpu_pack.py unpack .gpu/training_data.safetensors.xz /tmp/training_data.safetensors

Only the standard library, numpy and safetensors: the GPU machine has no SimpleITK or MONAI.
"""

from __future__ import annotations

import argparse
import json
import lzma
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save, save_file

LEVELS = 255


def metadata_of(data: bytes) -> dict[str, str]:
    """The metadata of a safetensors file held in memory: the `__metadata__` of its JSON header."""
    header_size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_size]).get("__metadata__", {})


def pack(source: Path, target: Path) -> None:
    data = source.read_bytes()
    tensors, metadata = load(data), metadata_of(data)
    images = tensors["images"].astype(np.float32)
    if images.min() < 0 or images.max() > 1:
        raise SystemExit(f"{source}: images outside [0, 1]; only windowed training data can be packed")
    tensors["images"] = np.round(images * LEVELS).astype(np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(lzma.compress(save(tensors, metadata=metadata), preset=6))
    print(f"{source} ({source.stat().st_size / 1e6:.1f} MB) -> {target} ({target.stat().st_size / 1e6:.1f} MB)")


def unpack(source: Path, target: Path) -> None:
    data = lzma.decompress(source.read_bytes())
    tensors = load(data)
    tensors["images"] = (tensors["images"].astype(np.float32) / LEVELS).astype(np.float16)
    save_file(tensors, str(target), metadata=metadata_of(data))
    print(f"{source} -> {target} ({target.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(args.source, args.target)


if __name__ == "__main__":
    main()
