"""The review page (/) and the slice data it draws (/v1/segmentations/{id}/review/...)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from autocontour.pipeline.outputs import REVIEW_CT
from autocontour.pipeline.versions import Version, note_in_summary, revert
from autocontour.server.auth import AuthenticatedFirst, require
from autocontour.server.dependencies import QueueDep, ResultsDep, ReviewDep
from autocontour.server.openapi import AUTH, problem_responses
from autocontour.server.problems import Problem
from autocontour.server.review import ReviewVolume
from autocontour.server.routers.editing import structure_name
from autocontour.server.routers.segmentations import finished

router = APIRouter(route_class=AuthenticatedFirst, tags=["review"])
REVIEW_ERRORS = problem_responses(*AUTH, 404, 409, described={
    404: "no such job (or another key's), a job that kept no CT for review, or a slice outside the volume"})
STATIC = Path(__file__).resolve().parent.parent / "static"
Plane = Literal["axial", "coronal", "sagittal"]


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page():
    """The review page: upload, progress, slice-by-slice review, downloads."""
    return HTMLResponse((STATIC / "index.html").read_text())


async def _volume(queue: QueueDep, results: ResultsDep, review: ReviewDep, job_id: str,
                  owner: str | None = require("read")) -> ReviewVolume:
    """The finished job's volume for review (a dependency of the review routes)."""
    job = finished(queue, job_id, owner)
    result_dir = results.result_dir(job.id)
    if not (result_dir / REVIEW_CT).is_file():
        raise Problem(404, "not-found", "Not found", "this job kept no CT for review")
    return await run_in_threadpool(review.get, job.id, result_dir)


Volume = Annotated[ReviewVolume, Depends(_volume)]


def _check(volume: ReviewVolume, plane: str, index: int) -> None:
    if not 0 <= index < volume.count(plane):
        raise Problem(404, "not-found", "Not found", f"{plane} slice {index} is outside 0..{volume.count(plane) - 1}")


@router.get("/v1/segmentations/{job_id}/review", responses=REVIEW_ERRORS)
async def review_info(volume: Volume):
    """What the viewer needs: planes, slice positions, structures with colours, confidence and flagged slices."""
    return volume.info()


@router.get("/v1/segmentations/{job_id}/review/{plane}/{index}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **REVIEW_ERRORS, **problem_responses(422)})
async def review_slice(volume: Volume, plane: Plane, index: int,
                       level: float = Query(40.0, ge=-2000, le=4000), width: float = Query(400.0, gt=1, le=6000)):
    """One CT slice in the given window (grey PNG)."""
    _check(volume, plane, index)
    png = await run_in_threadpool(volume.png, plane, index, level, width)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get("/v1/segmentations/{job_id}/review/{plane}/{index}/contours",
            responses={**REVIEW_ERRORS, **problem_responses(422)})
async def review_contours(volume: Volume, plane: Plane, index: int):
    """Each structure's contour on that slice: polylines of [column, row] pixel coordinates."""
    _check(volume, plane, index)
    return await run_in_threadpool(volume.contours, plane, index)


@router.post("/v1/segmentations/{job_id}/structures/{structure}/versions/{version}/revert", response_model=Version,
             tags=["editing"], responses=problem_responses(*AUTH, 404, 409, 422, described={
                 404: "no such job (or another key's), no such structure in it, or no such version",
                 409: "the job is not done, or another edit made a version meanwhile (retry)"}))
def revert_version(queue: QueueDep, results: ResultsDep, job_id: str, structure: str,
                   version: Annotated[int, PathParam(ge=0, le=1_000_000)], owner: str | None = require("segment")):
    """Undo: make an older version the newest again, as a new version (kind `revert`) that copies it, so
    nothing is overwritten and a later correction refines what was reverted to. The review page's undo of a
    propagation calls this."""
    job = finished(queue, job_id, owner)
    name = structure_name(structure)
    result_dir = results.result_dir(job.id)
    try:
        made = revert(result_dir, name, version, owner)
    except LookupError as exc:
        raise Problem(404, "not-found", "Not found", str(exc)) from None
    except FileExistsError:
        raise Problem(409, "conflict", "Conflict", "another edit made a version meanwhile; retry") from None
    note_in_summary(result_dir, name, made)
    return made
