"""The network on its device, at the precision that leaves its masks unchanged.

Loading is the one expensive, device-dependent step, and choosing bfloat16 on a CPU needs a check on real
support slices; both live here so the segmenter only runs what is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from autocontour.engine import Engine
from autocontour.engine.runner import cpu_has_native_bf16
from autocontour.engine.selection import SupportPool
from autocontour.model.weights import load_model
from autocontour.support.store import SupportSet

MIN_BF16_AGREEMENT = 0.99


class LoadedModel:
    """The engine that runs the network, its card, and why it runs at its precision."""

    def __init__(self, weights: Path, device: str, precision: str, caller_chose: bool, threads: int | None,
                 compile: bool, supports: dict[str, SupportSet], engine_options: dict | None = None):
        """`precision` "auto": bfloat16 on a CPU where it keeps the masks on the `supports`, else float32."""
        model, self.card = load_model(weights)
        self.engine = Engine(model, device, "float32" if precision == "auto" else precision, threads=threads,
                             compile=compile, **(engine_options or {}))
        if precision == "auto":
            self.precision_note = self._choose_cpu_precision(supports)
        else:
            self.precision_note = f"{precision}: {'set by the caller' if caller_chose else 'the device default'}"

    def _choose_cpu_precision(self, supports: dict[str, SupportSet]) -> str:
        """bfloat16 on a CPU with native bf16, if and only if it leaves the masks as float32 draws them; returns
        why the precision is what it is.

        Checked at start-up on real support slices (Dice of the masks >= MIN_BF16_AGREEMENT);
        bench/engine.py measures the same on whole scans.
        """
        if not cpu_has_native_bf16():
            return "float32: this CPU has no native bfloat16"
        if not supports:
            return "float32: no support set to check bfloat16 against"
        agreement = self.engine.agreement("bfloat16", SupportPool(supports).array)
        if agreement >= MIN_BF16_AGREEMENT:
            self.engine.precision = "bfloat16"
            return f"bfloat16: masks agree with float32 (Dice {agreement:.4f}) at start-up"
        return f"float32: bfloat16 changed the masks (Dice {agreement:.4f}) at start-up"

    @property
    def device_name(self) -> str:
        device = self.engine.device
        if device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(device)})"
        return "cpu"

    def describe(self) -> dict:
        """The model card with where and how the network runs."""
        return {**self.card.model_dump(), "device": self.device_name, "precision": self.engine.precision,
                "precision_note": self.precision_note}
