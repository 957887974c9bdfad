"""autocontour: few-shot, in-context draft contours for cervical-cancer radiotherapy planning CT.

    import autocontour
    from autocontour.options import SegmentOptions
    result = autocontour.segment("ct.nii.gz", "out/", SegmentOptions(structures=["bladder", "ctvn"]))
    print(result.summary.structures["bladder"].confidence)

`segment` is the function of `autocontour.pipeline`, imported on first use (it loads torch), so
`import autocontour` stays light and `help(autocontour.segment)` shows its real signature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["segment", "__version__"]

if TYPE_CHECKING:
    from autocontour.pipeline import segment


def __getattr__(name: str):
    if name == "segment":
        from autocontour.pipeline import segment

        return segment
    raise AttributeError(f"module 'autocontour' has no attribute {name!r}")
