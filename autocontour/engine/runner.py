"""The process's one owner of the network: device, precision, batching, memory.

Callers hand over many (query slice, support indices) requests at once; the
runner packs them into batches as large as memory allows, and when a batch
does not fit it splits it and carries on, so an out-of-memory condition slows
a job down instead of failing it.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from autocontour.engine.network import SplitUniverSeg
from autocontour.errors import OptionError
from autocontour.model.universeg import UniverSeg
from autocontour.overlap import dice

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Peak bytes per (query, support) pair and pixel, measured for the split network
# (see bench/engine.py): about 4 live feature maps of 64 float32 channels at full resolution.
BYTES_PER_PAIR_PIXEL = 4 * 64 * 4
CPU_MAX_PAIRS = 32  # larger CPU batches gain nothing and fall out of cache (bench/engine.py)
# A GPU batch of ~6 GiB (about 750 bf16 pairs at 128x128) already keeps an H100 busy; more memory
# buys no speed and leaves none for a second process on the card.
GPU_MAX_BATCH_GIB = 6.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device 'cuda' asked for, but no CUDA GPU is available")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 convolutions run natively (and fast) on this CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    By default every large tensor is its own mmap, returned to the kernel when
    it is freed; the next batch maps it again and the kernel zero-fills every
    page on first touch. On 2 cores that was 3.4 million page faults and 11 s
    of system time in the main job (bench/allocator.py). Served from the heap
    and never trimmed, the same pages are reused; the peak stays the same,
    since the process reaches it on every batch anyway. Returns whether glibc
    took the settings (not on musl, macOS or Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2 << 30


class Engine:
    """Runs the split UniverSeg on one device for batches of queries."""

    def __init__(self, model: UniverSeg, device: str = "auto", precision: str = "float32",
                 max_pairs_per_batch: int | None = None, memory_fraction: float | None = None,
                 threads: int | None = None, compile: bool = False, max_batch_gib: float = GPU_MAX_BATCH_GIB):
        """`compile` wraps the network in torch.compile; batches are then padded to one shape
        (no recompiles), and `warm_up` pays the compilation before the first job."""
        self.device = resolve_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.precision = precision
        if self.device.type == "cpu":
            torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
            keep_freed_memory()
        else:
            torch.backends.cudnn.benchmark = True  # pick the fastest kernels for our fixed shapes
        # channels-last suits both cuDNN and oneDNN convolutions (bench/RESULTS.md)
        self.net = SplitUniverSeg(model).to(self.device).eval().to(
            memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes memory_format; the stubs omit it
        self.forward = torch.compile(self.net.forward_pairs, dynamic=False) if compile else self.net.forward_pairs
        self.compiled = compile
        self.max_pairs_per_batch = max_pairs_per_batch
        # CPU: small batches stay in cache (measured in bench/engine.py); GPU: as much as fits
        self.memory_fraction = memory_fraction or (0.6 if self.device.type == "cuda" else 0.25)
        self.max_batch_bytes = max_batch_gib * 2**30

    def _autocast(self):
        if self.precision == "float32" and self.device.type == "cuda":
            # cuDNN convolves in TF32 by default (10-bit mantissa): probabilities then move by up to 2e-3 on an
            # H200 (bench/RESULTS.md); float32 here means float32
            cudnn = torch.backends.cudnn
            return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                               allow_tf32=False)
        if self.precision == "float32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def pairs_per_batch(self, height: int, width: int) -> int:
        """How many (query, support) pairs fit in one forward."""
        if self.max_pairs_per_batch:
            return self.max_pairs_per_batch
        budget = available_memory_bytes(self.device) * self.memory_fraction
        if self.device.type == "cuda":
            budget = min(budget, self.max_batch_bytes)
        per_pair = BYTES_PER_PAIR_PIXEL * height * width * (0.5 if self.precision != "float32" else 1.0)
        pairs = max(1, int(budget // per_pair))
        return min(pairs, CPU_MAX_PAIRS) if self.device.type == "cpu" else pairs

    @torch.inference_mode()
    def predict(self, queries: np.ndarray, pool: np.ndarray, index: np.ndarray,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Foreground probabilities for every query.

        queries: (B, H, W) images in [0, 1]; pool: (N, 2, H, W) support
        [image, label] pairs; index: (B, S) rows of pool indices, one support
        set per query. Returns (B, H, W) float32. `progress(n)` is called with
        the number of queries finished by each batch.
        """
        b, s = index.shape
        out = np.empty(queries.shape, dtype=np.float32)
        pool_t = torch.from_numpy(np.ascontiguousarray(pool, dtype=np.float32)).to(self.device)
        chunk = max(1, self.pairs_per_batch(*queries.shape[1:]) // s)
        start = 0
        while start < b:
            stop = min(b, start + chunk)
            try:
                out[start:stop] = self._forward(queries[start:stop], pool_t, index[start:stop],
                                                pad_to=chunk if self.compiled else None)
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                log.warning("out of memory: batch split to %d queries", chunk)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if progress:
                progress(stop - start)
            start = stop
        return out

    def agreement(self, precision: str, pool: np.ndarray, queries: int = 6, support_size: int = 4) -> float:
        """Mask Dice between float32 and `precision` on real slices: each query is a support slice,
        segmented with other slices of the same set as its supports.

        It checks the arithmetic, not the segmentation, so 4 supports a query do: 6 queries then fit
        one CPU batch per precision (1.3 s at start-up instead of 2.1 s with 8)."""
        rng = np.random.default_rng(0)
        picks = rng.choice(len(pool), size=min(queries, len(pool)), replace=False)
        index = np.stack([rng.choice(np.setdiff1d(np.arange(len(pool)), [q]), size=min(support_size, len(pool) - 1),
                                     replace=False) for q in picks])
        current = self.precision
        try:
            self.precision = "float32"
            reference = self.predict(pool[picks, 0], pool, index) > 0.5
            self.precision = precision
            reduced = self.predict(pool[picks, 0], pool, index) > 0.5
        finally:
            self.precision = current
        return dice(reference, reduced)

    def warm_up(self, support_size: int, size: int = 128) -> None:
        """Run the network once at the production shape so the first job does not pay for set-up."""
        queries = np.zeros((1, size, size), dtype=np.float32)
        pool = np.zeros((support_size, 2, size, size), dtype=np.float32)
        self.predict(queries, pool, np.arange(support_size)[None])

    def _forward(self, queries: np.ndarray, pool: torch.Tensor, index: np.ndarray,
                 pad_to: int | None = None) -> np.ndarray:
        n = len(queries)
        if pad_to and n < pad_to:  # one shape for a compiled network
            queries = np.concatenate([queries, np.zeros((pad_to - n, *queries.shape[1:]), queries.dtype)])
            index = np.concatenate([index, np.repeat(index[:1], pad_to - n, axis=0)])
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device).unsqueeze(1)
        support = pool[torch.from_numpy(np.ascontiguousarray(index)).to(self.device)]
        with self._autocast():
            logits = self.forward(q, support)
        return torch.sigmoid(logits.float()).squeeze(1)[:n].cpu().numpy()
