"""/v1/structures and /v1/model: what this server segments, and with which weights."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.catalogue import ALLOWED_OVERLAPS, STRUCTURES
from app.server.auth import require
from app.server.openapi import AUTH, problem_responses

router = APIRouter(prefix="/v1", tags=["catalogue"], responses=problem_responses(*AUTH))


@router.get("/structures")
def structures(request: Request, _: str | None = require("read")):
    """The structure catalogue, each with its support set or the fact that none is configured."""
    supports = request.app.state.segmenter.supports
    items = []
    for s in STRUCTURES.values():
        support = supports.get(s.name)
        items.append({
            "name": s.name, "display_name": s.display_name, "colour": list(s.colour), "kind": s.kind,
            "description": s.description,
            "support_set": support.describe() if support else None,
            "available": support is not None,
            "how_to_add": None if support else
            f"autocontour support build {s.name} --case CT MASK [--case ...] --out DIR, then configure the folder "
            "in AUTOCONTOUR_SUPPORT_DIRS",
        })
    return {"structures": items,
            "overlaps_allowed": sorted(sorted(p) for p in ALLOWED_OVERLAPS),
            "rule": "CTVn, CTVp and anorectum never overlap; bladder may overlap CTVn; "
                    "parametrium may overlap anything"}


@router.get("/model")
def model(request: Request, _: str | None = require("read")):
    """The model card: name, version, SHA-256, licence, device, precision (with Celery: "separate workers")."""
    return request.app.state.segmenter.describe_model()
