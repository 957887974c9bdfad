"""autocontour: few-shot, in-context draft contours for cervical-cancer radiotherapy planning CT."""

__version__ = "0.1.0"


def segment(*args, **kwargs):
    """See `app.pipeline.segment` (imported lazily: it loads torch)."""
    from app.pipeline import segment as _segment

    return _segment(*args, **kwargs)
