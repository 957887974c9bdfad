"""A bound on the uploads decoded at once: each decode can take up to AUTOCONTOUR_MAX_DECODED_BYTES of memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from autocontour.server.problems import Problem

T = TypeVar("T")


def decode_limited(state, decode: Callable[..., T], *args) -> T:
    """Run `decode` (blocking; call it in a worker thread) in one of AUTOCONTOUR_MAX_CONCURRENT_DECODES slots.

    An upload that finds every slot taken waits up to Retry-After seconds, then gets 503 + Retry-After,
    so that concurrent uploads cannot multiply the memory one upload may cost.
    """
    settings = state.settings
    if not state.decodes.acquire(timeout=settings.retry_after_s):
        raise Problem(503, "busy", "Busy", f"{settings.max_concurrent_decodes} uploads are being checked; "
                      f"retry after {settings.retry_after_s} s", headers={"Retry-After": str(settings.retry_after_s)})
    try:
        return decode(*args)
    finally:
        state.decodes.release()
