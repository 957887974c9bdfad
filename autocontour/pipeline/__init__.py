"""From a CT to draft contours: the segmenter and its stages, the summary, the outputs, and what an API-only
process loads (`autocontour.pipeline.library`)."""

from autocontour.pipeline.segmenter import CancelledError, SegmentationResult, Segmenter, segment

__all__ = ["CancelledError", "SegmentationResult", "Segmenter", "segment"]
