"""A bound on the uploads decoded at once: each decode can take up to AUTOCONTOUR_MAX_DECODED_BYTES of memory."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from autocontour.server.problems import Problem
from autocontour.server.settings import ServerSettings

T = TypeVar("T")


def decode_limited(slots: threading.BoundedSemaphore, settings: ServerSettings, decode: Callable[..., T],
                   *args) -> T:
    """Run `decode` (blocking; call it in a worker thread) in one of AUTOCONTOUR_MAX_CONCURRENT_DECODES `slots`.

    An upload that finds every slot taken waits up to Retry-After seconds, then gets 503 + Retry-After,
    so that concurrent uploads cannot multiply the memory one upload may cost.
    """
    if not slots.acquire(timeout=settings.retry_after_s):
        raise Problem(503, "busy", "Busy", f"{settings.max_concurrent_decodes} uploads are being checked; "
                      f"retry after {settings.retry_after_s} s", headers={"Retry-After": str(settings.retry_after_s)})
    try:
        return decode(*args)
    finally:
        slots.release()
