"""/v1/structures and /v1/model: what this server segments, and with which weights."""

from __future__ import annotations

from fastapi import APIRouter

from autocontour.server.auth import AuthenticatedFirst, require
from autocontour.server.dependencies import LibraryDep, ModelDep
from autocontour.server.openapi import AUTH, problem_responses

router = APIRouter(route_class=AuthenticatedFirst, prefix="/v1", tags=["catalogue"], responses=problem_responses(*AUTH))


@router.get("/structures")
def structures(library: LibraryDep, _: str | None = require("read")):
    """The structures the loaded support sets provide (and the built-in cervix ones that have none),
    each with its definition and support set, and the overlap rules in force."""
    items = []
    for s in library.catalogue:
        support = library.supports.get(s.name)
        items.append({
            **s.model_dump(mode="json"),
            "support_set": support.describe() if support else None,
            "available": support is not None,
            "how_to_add": None if support else
            f"autocontour support build {s.name} --case CT MASK_OR_RTSTRUCT [--roi NAME] [--case ...] --out DIR, "
            "then add the folder to AUTOCONTOUR_SUPPORT_DIRS",
        })
    return {"structures": items, "overlap_rules": library.rules.describe(library.catalogue.available)}


@router.get("/model")
def model(described: ModelDep, _: str | None = require("read")):
    """The model card: name, version, SHA-256, licence, device, precision (with Celery: "separate workers")."""
    return described.describe_model()
