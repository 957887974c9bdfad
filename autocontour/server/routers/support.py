"""Growing the clinic's support sets from the review page: an approved case joins its structure's set."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from autocontour.server.auth import AuthenticatedFirst, require
from autocontour.server.decoding import decode_limited
from autocontour.server.dependencies import DecodesDep, LibraryDep, QueueDep, ResultsDep, SettingsDep
from autocontour.server.openapi import AUTH, problem_responses
from autocontour.server.problems import Problem
from autocontour.server.routers.editing import structure_name
from autocontour.server.routers.segmentations import finished
from autocontour.server.settings import SUPPORT_WRITE
from autocontour.support.grow import add_approved_result
from autocontour.support.store import SourceCase

router = APIRouter(route_class=AuthenticatedFirst, prefix="/v1/segmentations", tags=["support sets"])
ADD_ERRORS = problem_responses(*AUTH, 404, 409, 422, 503, described={
    503: "another addition to the set is still running, or the set's folder cannot be written",
    403: "the API key lacks the support:write scope, or the server has no API keys (the scope is required)",
    404: "no such job (or another key's, or expired), or no support set of that structure on this server",
    409: "the job is not done or not approved (or its approval does not cover the structure); the scan is "
         "already a case of the set (same fingerprint); the set is the shipped one, which is never written",
    422: "an invalid structure name, or a case that cannot become a support case (the set names why)"})


class SupportCaseAdded(BaseModel):
    """The grown set and the case the job became."""

    structure: str
    support_set: dict = Field(description="the grown set as /v1/structures describes it (a new id)")
    previous_id: str = Field(description="the set's id before the case joined it")
    case: SourceCase = Field(description="the new source case: fingerprint, slices taken, and its provenance "
                                         "(kind result, the job, who approved and when)")


@router.post("/{job_id}/structures/{structure}/add-to-support-set", response_model=SupportCaseAdded,
             responses=ADD_ERRORS)
async def add_to_support_set(settings: SettingsDep, queue: QueueDep, results: ResultsDep, library: LibraryDep,
                             decodes: DecodesDep, job_id: str, structure: str,
                             owner: str | None = require(SUPPORT_WRITE)):
    """Add the job's approved version of the structure, on the CT it segmented, to the structure's support set on
    this server, and use the grown set from the next job on. Only an approved job is taken, a scan only once;
    the set keeps its slices and gains this case's, as `autocontour support add --from-result` does."""
    if not settings.api_keys:
        raise Problem(403, "forbidden", "Forbidden", "adding to a support set needs an API key with the "
                      f"{SUPPORT_WRITE} scope, and this server has no API keys (AUTOCONTOUR_API_KEYS)")
    job = finished(queue, job_id, owner)
    name = structure_name(structure)
    if name in library.supports:  # grown by another process since: that set's id is the previous one
        await run_in_threadpool(library.refresh, name)
    support = library.supports.get(name)
    if support is None or support.path is None:
        raise Problem(404, "not-found", "Not found", f"this server has no support set of {name} to add to")
    if support.path.resolve().is_relative_to(library.settings.shipped_support_dir.resolve()):
        raise Problem(409, "shipped-support-set", "Shipped support set",
                      f"the support set of {name} is the shipped one, which is never written: copy it into a "
                      "folder of AUTOCONTOUR_SUPPORT_DIRS to grow it")
    previous = support.id
    try:
        grown = await run_in_threadpool(decode_limited, decodes, settings, add_approved_result, support.path,
                                        results.result_dir(job.id), name, job.id)
    except OSError as error:  # a read-only or full disk: the set is left as it was
        raise Problem(503, "support-set-not-written", "Support set not written",
                      f"the support set of {name} could not be written: {error.strerror}") from None
    await run_in_threadpool(library.refresh, name)
    return SupportCaseAdded(structure=name, support_set=grown.describe(), previous_id=previous,
                            case=grown.manifest.source_cases[-1])
