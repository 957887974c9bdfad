"""The OpenAPI description, in step with what the service answers.

Every error is an RFC 9457 problem document (`application/problem+json`, the
`Problem` schema below, with a string `detail`). Routes declare the errors they
can answer with `problem_responses(...)`; `install` adds the `Problem` schema to
the components and replaces FastAPI's default 422 (`application/json` with a
list `detail`, which this service never sends) by the problem document.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from autocontour.server.problems import MEDIA_TYPE, TYPE_PREFIX

REF = "#/components/schemas/Problem"


class FieldError(BaseModel):
    field: str = Field(description="the invalid field, e.g. body.threshold or query.limit")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document: the body of every error this API returns."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": f"{TYPE_PREFIX}invalid-image", "title": "Invalid image", "status": 422,
        "detail": "the file is truncated: it holds 1,024 of the 4,194,656 bytes its header promises",
        "request_id": "5f0c2b7e9d4a4c59a1f3e8b2c6d7a901"}]})

    type: str = Field(description=f"{TYPE_PREFIX}CODE: what kind of problem (stable; match on it)")
    title: str = Field(description="a short summary of that kind of problem")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what is wrong with this request, in words")
    request_id: str = Field(description="the request's X-Request-ID; the server's log lines carry it too")
    errors: list[FieldError] | None = Field(None, description="with 422 for invalid fields: each field")


class Readiness(BaseModel):
    """The /readyz answer: 200 when every check passes, else 503."""

    status: Literal["ready", "not ready"]
    model: str = Field(description="what this process holds of the model: the network (embedded worker), or only "
                                   "its card while the network runs in separate workers (Celery)")
    checks: dict[str, bool] = Field(description="each check by name, true when it passes")


DESCRIPTIONS = {
    400: "the request body is malformed (not parseable multipart form data)",
    401: "an API key is required, or the one given is not valid (only when keys are configured)",
    403: "the API key lacks the scope this endpoint needs",
    404: "no such job (or another key's, or expired), or no such file in it",
    409: "the job is not done: queued or running (with Retry-After), failed or cancelled",
    413: "the request body is larger than AUTOCONTOUR_MAX_UPLOAD_BYTES",
    422: "an invalid input, option or field; `detail` names it (`errors` lists invalid fields)",
    500: "an unexpected server error; the server log (by request id) has details",
    503: "the queue is full, its broker unreachable, or every decode slot busy; retry after Retry-After seconds",
}
HEADERS = {
    401: {"WWW-Authenticate": {"description": 'Bearer realm="autocontour"', "schema": {"type": "string"}}},
    409: {"Retry-After": {"description": "while the job is queued or running: seconds to wait",
                          "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}
AUTH = (401, 403)


def problem_response(code: int, description: str | None = None) -> dict:
    """The OpenAPI response object of one error status: a problem document."""
    response = {"description": description or DESCRIPTIONS[code], "content": {MEDIA_TYPE: {"schema": {"$ref": REF}}}}
    if code in HEADERS:
        response["headers"] = HEADERS[code]
    return response


def problem_responses(*codes: int, described: dict[int, str] | None = None) -> dict[int | str, dict]:
    """`responses=` for a route or router: these error codes, each a problem document."""
    described = described or {}
    return {code: problem_response(code, described.get(code)) for code in codes}


def install(app: FastAPI, pacs: bool, keys: bool) -> None:
    """Make `app.openapi()` describe errors as they are sent (see the module docstring), the upload
    form as this server takes it (`pacs`: whether a PACS is configured), and how to authenticate
    (`keys`: whether API keys are configured; an open server asks for none)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            _use_problems(schema)
            _upload_form(schema, pacs)
            if keys:
                _security(schema)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "an API key: `Authorization: Bearer KEY` (`autocontour keys hash KEY` gives the "
                                  "SHA-256 the server is configured with)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "the same key"},
}


def _security(schema: dict) -> None:
    """Declare the key schemes, and require one on every operation that answers 401 without a key (the
    health, readiness and metrics probes stay open): clients and fuzzers then know keys are needed."""
    schema["components"]["securitySchemes"] = SECURITY_SCHEMES
    for operations in schema["paths"].values():
        for operation in operations.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]


def _upload_form(schema: dict, pacs: bool) -> None:
    """FastAPI marks `file` optional because a PACS study may stand in for it; without a PACS it is required,
    and the PACS fields are not taken at all."""
    body = schema["paths"]["/v1/segmentations"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    form["properties"]["file"].pop("anyOf")
    form["properties"]["file"] |= {"type": "string", "contentMediaType": "application/octet-stream"}
    if not pacs:
        for name in ("study_uid", "series_uid", "push_to_pacs"):
            form["properties"].pop(name)
        form["required"] = sorted({*form.get("required", []), "file"})


def _use_problems(schema: dict) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            for code, response in operation.get("responses", {}).items():
                refs = [c.get("schema", {}).get("$ref", "") for c in response.get("content", {}).values()]
                if any(r.endswith("/HTTPValidationError") for r in refs):  # FastAPI's default 422
                    response.clear()
                    response.update(problem_response(int(code)))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
