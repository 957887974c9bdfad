"""The in-context network and the weights it runs with."""

from app.model.universeg import UniverSeg

__all__ = ["UniverSeg"]
