"""Optional API keys: 401 without a valid key, 403 for a key without the scope.

Keys are configured as SHA-256 hashes (`autocontour keys hash KEY`), sent as
`Authorization: Bearer KEY` or `X-API-Key: KEY`, and compared in constant time.
With no keys configured the API is open (for a workstation or a closed network).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request

from autocontour.server.problems import Problem


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def require(scope: str):
    """A dependency that returns the caller's key name (None when auth is off)."""

    def dependency(request: Request) -> str | None:
        keys = request.app.state.settings.api_keys
        if not keys:
            return None
        presented = _presented_key(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="autocontour"'}
        if presented is None:
            raise Problem(401, "unauthorized", "Unauthorized", "an API key is required (Authorization: Bearer KEY)",
                          challenge)
        digest = hash_key(presented)
        name = next((n for n, k in keys.items() if hmac.compare_digest(k.sha256, digest)), None)
        if name is None:
            raise Problem(401, "unauthorized", "Unauthorized", "the API key is not valid", challenge)
        if scope not in keys[name].scopes:
            raise Problem(403, "forbidden", "Forbidden", f"this API key may not {scope}")
        return name

    return Depends(dependency)
