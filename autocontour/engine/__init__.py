"""Stage 4: run the network over the slices that matter, with the right examples.

Names are imported lazily so that `autocontour.engine.network` (the split network) can
be used where SimpleITK is not installed, e.g. for training on a GPU machine.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "autocontour.engine.runner", "resolve_device": "autocontour.engine.runner",
    "SplitUniverSeg": "autocontour.engine.network",
    "StructurePrediction": "autocontour.engine.prediction", "predict_structures": "autocontour.engine.plan",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'autocontour.engine' has no attribute {name!r}")
