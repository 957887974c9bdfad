"""Editing a finished job: propagate or correct a structure (every edit a version), list versions, approve."""

from __future__ import annotations

import contextlib
import re
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from autocontour.catalogue import StructureDefinition, default_definition, parse_structures
from autocontour.dicom.reading import read_input
from autocontour.errors import UnknownStructureError
from autocontour.pipeline.approval import Approval, approve
from autocontour.pipeline.editing import Edit, current_version
from autocontour.pipeline.versions import (
    StructureVersions,
    Version,
    drawn_definition,
    save_drawn_definition,
    versions_of,
)
from autocontour.server.auth import AuthenticatedFirst, require
from autocontour.server.decoding import decode_limited
from autocontour.server.dependencies import DecodesDep, JobsDep, QueueDep, ResultsDep, SettingsDep
from autocontour.server.editing import (
    EditRequest,
    EditTimeout,
    drawn_upload_name,
    edit_outcome,
    read_edit,
    source_series,
)
from autocontour.server.jobs import Job, JobStore, QueueUnavailable, ResultStore
from autocontour.server.openapi import AUTH, problem_responses
from autocontour.server.problems import Problem
from autocontour.server.queue import JobQueue
from autocontour.server.routers.segmentations import COPY_CHUNK, finished
from autocontour.server.settings import ServerSettings

router = APIRouter(route_class=AuthenticatedFirst, prefix="/v1/segmentations", tags=["editing"],
                   responses=problem_responses(*AUTH))
EDIT_ERRORS = problem_responses(404, 409, 413, 422, 503, described={
    404: "no such job (or another key's, or expired)",
    409: "the job is not done (queued or running: with Retry-After; failed or cancelled), or kept no CT to edit on",
    422: "an invalid structure name, `slices`, `ends`, `display_name` or `colour` (or either for a structure the "
         "job segmented); a drawn mask that is unreadable, on another grid than "
         "the job's CT, or holds more than one label; a listed slice outside the scan or (for a new structure) "
         "empty; nothing drawn at all",
    503: "the network stayed busy with a job, or no worker answered, within AUTOCONTOUR_EDIT_TIMEOUT_S; retry "
         "after Retry-After seconds"})
FILE_ERRORS = problem_responses(404, 409, described={
    404: "no such job (or another key's, or expired), no such structure in it, or no such version"})


def structure_name(structure: str) -> str:
    """The path's structure, checked like the CLI's --structure (422 naming a malformed name)."""
    names = parse_structures(structure)
    if len(names) != 1:
        raise UnknownStructureError(f"one structure at a time; got {len(names)}: {', '.join(names)}")
    return names[0]


def slice_numbers(text: str | None) -> list[int] | None:
    """The `slices` form field: comma-separated input k indices; absent or blank: every slice drawn on."""
    if text is None or not text.strip():
        return None
    try:
        slices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise Problem(422, "invalid-option", "Invalid option",
                      f"slices: expected comma-separated slice numbers, got {text[:40]!r}") from None
    if not slices:
        raise Problem(422, "invalid-option", "Invalid option", "slices: no slice number listed")
    return slices


COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
# What a DICOM LO value (an RTSTRUCT's ROI name, a SEG's segment label) may hold: no control character, no backslash
DISPLAY_NAME = re.compile(r"[^\\\x00-\x1f\x7f]{1,64}")


def drawn_structure_definition(job: Job, results: ResultStore, name: str, display_name: str | None,
                               colour: str | None) -> StructureDefinition | None:
    """A drawn structure's display name and colour (what the RTSTRUCT and SEG written at approval call and
    colour it), checked; None when the request gives neither. A structure the job segmented keeps its
    support set's definition: naming it anew is refused."""
    if display_name is None and colour is None:
        return None
    if name in job.options["structures"]:
        raise Problem(422, "invalid-option", "Invalid option", f"display_name and colour describe a new structure; "
                      f"{name} was segmented and keeps its support set's definition")
    fields: dict = {}
    if colour is not None:
        if not COLOUR.fullmatch(colour):
            raise Problem(422, "invalid-option", "Invalid option", f"colour: expected #rrggbb, got {colour[:20]!r}")
        fields["colour"] = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    if display_name is not None:
        display_name = display_name.strip()
        if not DISPLAY_NAME.fullmatch(display_name):
            raise Problem(422, "invalid-option", "Invalid option", "display_name: 1 to 64 characters, without "
                          "control characters or backslashes (a DICOM ROI name)")
        fields["display_name"] = display_name
    base = drawn_definition(results.result_dir(job.id), name) or default_definition(name)
    return base.model_copy(update=fields)


async def _receive_drawn(drawn: UploadFile, results: ResultStore, job_id: str) -> tuple[str, Path]:
    """The drawn mask streamed into the job's upload folder (removed once the edit is answered)."""
    name = drawn_upload_name(await drawn.read(2), uuid.uuid4().hex)
    await drawn.seek(0)
    path = results.upload_path(job_id, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        while chunk := await drawn.read(COPY_CHUNK):
            out.write(chunk)
    return name, path


def _run_edit(queue: JobQueue, request: EditRequest, edit: Edit, settings: ServerSettings) -> dict:
    """The edit where the network is; 503 + Retry-After when nothing runs it in time."""
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        return queue.edit(request, edit)
    except EditTimeout as exc:
        raise Problem(503, "busy", "Busy", f"{exc}; retry later", headers=retry) from None
    except QueueUnavailable as exc:
        raise Problem(503, "queue-unavailable", "Queue unavailable", f"{exc}; retry later", headers=retry) from None


@router.post("/{job_id}/structures/{structure}/propagate", response_model=Version, responses=EDIT_ERRORS)
async def propagate(
    settings: SettingsDep,
    queue: QueueDep,
    results: ResultsDep,
    decodes: DecodesDep,
    job_id: str,
    structure: str,
    drawn: Annotated[UploadFile, File(description="NIfTI mask on the job's input grid (same size, spacing, origin, "
                                                  "direction as the CT) holding the drawn or corrected contours")],
    slices: Annotated[str | None, Form(description="the drawn slices, comma-separated, as indices along the input's "
                                                   "third axis from 0 (NIfTI k; a DICOM series: its slices in order "
                                                   "of position); default: every slice where `drawn` holds any. On "
                                                   "a structure the job holds, a listed empty slice erases it "
                                                   "there")] = None,
    ends: Annotated[Literal["continue", "drawn"], Form(
        description="continue: beyond the outermost drawn slices the structure goes on while it shows; drawn: "
                    "they are its ends")] = "continue",
    display_name: Annotated[str | None, Form(description="a structure the job did not segment: its name in the "
                                                         "RTSTRUCT (ROI name) and DICOM-SEG (segment label) written "
                                                         "at approval, up to 64 characters; default: from the "
                                                         "structure's name (kept from an earlier edit)")] = None,
    colour: Annotated[str | None, Form(description="a structure the job did not segment: its colour as #rrggbb "
                                                   "(RTSTRUCT ROI display colour, SEG segment colour); default: "
                                                   "one of the palette (kept from an earlier edit)")] = None,
    owner: str | None = require("segment"),
):
    """Edit one structure of a finished job: the drawn slices are truth and come back exactly; a structure the job
    holds is corrected (the slices the correction affects are re-propagated), any other is propagated from the
    drawn slices alone. Answers with the new version; nothing is overwritten."""
    job = finished(queue, job_id, owner)
    name = structure_name(structure)
    definition = drawn_structure_definition(job, results, name, display_name, colour)
    request = EditRequest(job_id=job.id, structure=name, drawn="", slices=slice_numbers(slices),
                          ends_drawn=ends == "drawn", author=owner)
    request.drawn, path = await _receive_drawn(drawn, results, job.id)
    try:
        edit = await run_in_threadpool(decode_limited, decodes, settings, read_edit, results, request, settings)
        answer = await run_in_threadpool(_run_edit, queue, request, edit, settings)
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # the job's upload folder, once no other edit's mask is in it
    version = edit_outcome(answer)
    if definition is not None:
        save_drawn_definition(results.result_dir(job.id), definition)
    return version


def _versions(job: Job, results: ResultStore, structure: str) -> list[Version]:
    """The structure's versions; a structure the job segmented has at least its draft (version 0)."""
    result_dir = results.result_dir(job.id)
    if structure in job.options["structures"]:
        current_version(result_dir, structure)  # registers the draft as version 0 on first use
    versions = StructureVersions(result_dir, structure).all()
    if not versions:
        raise Problem(404, "not-found", "Not found", f"the job has no structure {structure!r}")
    return versions


@router.get("/{job_id}/structures/{structure}/versions", response_model=list[Version],
            responses={**FILE_ERRORS, **problem_responses(422)})
def list_versions(queue: QueueDep, results: ResultsDep, job_id: str, structure: str,
                  owner: str | None = require("read")):
    """Every version of one structure, oldest first: what each edit drew, changed and suggests next."""
    job = finished(queue, job_id, owner)
    return _versions(job, results, structure_name(structure))


def _approve(settings: ServerSettings, jobs: JobStore, results: ResultStore, job: Job,
             owner: str | None) -> Approval:
    """Approve, rebuild the zip, and note the approval (and any DICOM file it wrote) in the job's record."""
    from autocontour.dicom.outputs import RTSTRUCT_FILE, SEG_FILE

    result_dir = results.result_dir(job.id)
    segmented = list(job.options["structures"])
    structures = segmented + [s for s in versions_of(result_dir) if s not in segmented]
    source = source_series(results, job.id)
    series = read_input(source, settings, job.options.get("series_uid"))[1] if source else None
    approval = approve(result_dir, structures, owner or "anonymous", series, job.options.get("roi_names", "display"))
    results.rezip(job.id)
    record = dict(job.result or {})
    written = {k: n for k, n in (("rtstruct", RTSTRUCT_FILE), ("seg", SEG_FILE)) if n in approval.files}
    record["files"] = record.get("files", {}) | written
    record["approval"] = approval.model_dump(exclude={"files"})
    jobs.set_result(job.id, record)
    return approval


@router.post("/{job_id}/approve", response_model=Approval, responses={**FILE_ERRORS, **problem_responses(503)})
async def approve_job(settings: SettingsDep, queue: QueueDep, jobs: JobsDep, results: ResultsDep,
                      decodes: DecodesDep, job_id: str, owner: str | None = require("segment")):
    """Approve the job's contours as they are now: the result zip, the masks and (for DICOM input) the RTSTRUCT,
    marked APPROVED with the API key's name, and the DICOM-SEG then hold each structure's newest version, and
    summary.json's `approval` says which. Later edits are new versions; approve again to publish them."""
    job = finished(queue, job_id, owner)
    return await run_in_threadpool(decode_limited, decodes, settings, _approve, settings, jobs, results, job, owner)
