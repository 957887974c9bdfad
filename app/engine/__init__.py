"""Stage 4: run the network over the slices that matter, with the right examples."""

from app.engine.network import SplitUniverSeg
from app.engine.plan import InferenceOptions, StructurePrediction, predict_structures
from app.engine.runner import Engine, resolve_device

__all__ = ["Engine", "InferenceOptions", "SplitUniverSeg", "StructurePrediction", "predict_structures", "resolve_device"]
