"""Optional API keys: 401 without a valid key, 403 for a key without the scope.

Keys are configured as SHA-256 hashes (`autocontour keys hash KEY`), sent as
`Authorization: Bearer KEY` or `X-API-Key: KEY`, and compared in constant time.
With no keys configured the API is open (for a workstation or a closed network).

A key is checked before the request body is read (`AuthenticatedFirst`): a
caller without a valid key cannot make the server read, spool or store an upload.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from autocontour.server.problems import Problem


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def authenticate(request: Request, scope: str) -> str | None:
    """The caller's key name (None when auth is off); a Problem (401, 403) for a missing, unknown or
    insufficient key. Reads only the headers."""
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


@dataclass(frozen=True)
class Requirement:
    """The dependency `require` declares: the route's scope, for `AuthenticatedFirst` to find."""

    scope: str

    def __call__(self, request: Request) -> str | None:
        return authenticate(request, self.scope)


def require(scope: str):
    """A dependency that returns the caller's key name (None when auth is off)."""
    return Depends(Requirement(scope))


def required_scope(dependant: Dependant) -> str | None:
    """The scope a route's dependencies (at any depth) require, if any."""
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, Requirement):
            return dependency.call.scope
        if (found := required_scope(dependency)) is not None:
            return found
    return None


class AuthenticatedFirst(APIRoute):
    """A route that checks the caller's key before its body is read.

    FastAPI reads a form (spooling its files to temporary files) before it solves any dependency, so
    `require` alone answered a keyless 900 MB upload with 401 only after reading and storing all of it.
    A refusal of a request with a body closes the connection: the unread body is not waited for.
    """

    def get_route_handler(self):
        handler = super().get_route_handler()
        scope = required_scope(self.dependant)
        if scope is None:
            return handler

        async def authenticated_first(request: Request):
            try:
                authenticate(request, scope)
            except Problem as refused:
                if _has_body(request):
                    refused.headers["Connection"] = "close"
                raise
            return await handler(request)

        return authenticated_first


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
