"""RFC 9457 problem details: every error the API returns names what is wrong.

    {"type": "urn:autocontour:problem:invalid-image", "title": "Invalid image",
     "status": 422, "detail": "the file is truncated: ...", "request_id": "..."}
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from autocontour.errors import AutocontourError
from autocontour.server.context import request_id

MEDIA_TYPE = "application/problem+json"
HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
TYPE_PREFIX = "urn:autocontour:problem:"


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, code: str, title: str, detail: str, headers: dict | None = None, **extra):
        super().__init__(detail)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        return problem_response(self.status, self.code, self.title, self.detail, self.headers, **self.extra)


def queue_full(max_queue: int, retry_after_s: int) -> Problem:
    """503 + Retry-After: the queue holds `max_queue` waiting jobs."""
    return Problem(503, "queue-full", "Queue full", f"{max_queue} jobs are waiting; retry after {retry_after_s} s",
                   headers={"Retry-After": str(retry_after_s)})


class BodyTooLarge(Exception):
    """A request body grew past AUTOCONTOUR_MAX_UPLOAD_BYTES while it streamed in (declared or chunked)."""

    def __init__(self, limit: int):
        super().__init__(f"the request body exceeds {limit:,} bytes")
        self.limit = limit

    def problem(self) -> Problem:
        return Problem(413, "too-large", "Upload too large", str(self))


def internal_error_response() -> JSONResponse:
    """The answer to an unhandled error: a problem document with the request id; the log has the details."""
    return problem_response(500, "internal-error", "Internal error",
                            "an unexpected error; the server log has details under this request id")


def problem_body(status: int, code: str, title: str, detail: str, **extra) -> dict:
    return {"type": TYPE_PREFIX + code, "title": title, "status": status, "detail": detail,
            "request_id": request_id.get(), **extra}


def problem_response(status: int, code: str, title: str, detail: str, headers: dict | None = None,
                     **extra) -> JSONResponse:
    return JSONResponse(problem_body(status, code, title, detail, **extra), status_code=status,
                        media_type=MEDIA_TYPE, headers=headers)


def from_error(error: AutocontourError) -> dict:
    """A problem document for an input error (also stored with failed jobs)."""
    title = error.code.replace("-", " ").capitalize()
    return problem_body(error.http_status, error.code, title, str(error))


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem):
        return exc.response()

    @app.exception_handler(AutocontourError)
    async def _input_error(_: Request, exc: AutocontourError):
        body = from_error(exc)
        return JSONResponse(body, status_code=exc.http_status, media_type=MEDIA_TYPE)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        missing = first.get("type") == "missing"
        detail = f"missing field {where!r}" if missing else f"{where}: {first.get('msg', 'invalid value')}"
        return problem_response(422, "missing-field" if missing else "invalid-option",
                                "Missing field" if missing else "Invalid option", detail,
                                errors=[{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")}
                                        for e in errors])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        too_large = _body_too_large(exc.__cause__)
        if too_large is not None:  # FastAPI reports a body that failed to stream in as a 400
            return too_large.problem().response()
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        headers = dict(getattr(exc, "headers", None) or {})
        documented = allowed_methods(request.app, request.url.path) if exc.status_code == 405 else None
        if documented:  # Starlette names the methods of the first route of the path only
            headers["Allow"] = ", ".join(documented)
        return problem_response(exc.status_code, code, code.replace("-", " ").capitalize(), str(exc.detail),
                                headers or None)


def _body_too_large(cause: BaseException | None) -> BodyTooLarge | None:
    """The BodyTooLarge behind an error, also inside the exception group of a middleware's task group."""
    if isinstance(cause, BaseExceptionGroup):
        found: BaseException | None = cause.subgroup(BodyTooLarge)
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        return found if isinstance(found, BodyTooLarge) else None
    return cause if isinstance(cause, BodyTooLarge) else None


def allowed_methods(app: FastAPI, path: str) -> list[str] | None:
    """The methods the schema documents for this path (None for a path outside it), for a 405's `Allow`."""
    for template, item in app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path):
            return sorted(method.upper() for method in item if method.upper() in HTTP_METHODS)
    return None
