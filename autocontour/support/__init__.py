"""Stage 3: support sets, the labelled examples that tell the network what to segment."""

from autocontour.support.store import SupportSet, discover, load_support_set

__all__ = ["SupportSet", "discover", "load_support_set"]
