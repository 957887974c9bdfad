"""The in-context network and the weights it runs with."""

from autocontour.model.universeg import UniverSeg

__all__ = ["UniverSeg"]
