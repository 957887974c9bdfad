"""/v1/segmentations: submit a CT, follow the job, fetch the draft contours."""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from autocontour.catalogue import DEFAULT_STRUCTURES
from autocontour.dicom.reading import read_input
from autocontour.errors import InputImageError
from autocontour.export import PREVIEW, SUMMARY
from autocontour.options import SegmentOptions
from autocontour.pipeline.summary import DRAFT_DISCLAIMER
from autocontour.server.auth import require
from autocontour.server.context import request_id
from autocontour.server.decoding import decode_limited
from autocontour.server.dependencies import DecodesDep, JobsDep, LibraryDep, QueueDep, ResultsDep, SettingsDep
from autocontour.server.editing import mask_path
from autocontour.server.jobs import FINAL, Job, QueueFull, QueueUnavailable, ResultStore
from autocontour.server.openapi import AUTH, problem_responses
from autocontour.server.problems import Problem, queue_full
from autocontour.server.queue import JobQueue
from autocontour.server.settings import ServerSettings

router = APIRouter(prefix="/v1/segmentations", tags=["segmentations"], responses=problem_responses(*AUTH))
COPY_CHUNK = 1 << 20


class Progress(BaseModel):
    phase: str | None = Field(None, description="coarse (finding each structure's extent) or fine")
    slices_done: int | None = None
    slices_total: int | None = None
    structures: dict[str, dict[str, int]] = {}
    worker: str | None = Field(None, description="the worker running the job (distributed mode)")
    attempt: int | None = None


class SegmentationJob(BaseModel):
    """A segmentation job. Results are drafts for clinical review."""

    id: str
    status: str = Field(description="queued, running, done, failed or cancelled")
    disclaimer: str = DRAFT_DISCLAIMER
    created: str
    started: str | None = None
    finished: str | None = None
    options: dict
    progress: Progress
    result: dict | None = Field(None, description="per-structure volume, confidence, flags; timings; model")
    error: dict | None = Field(None, description="an RFC 9457 problem document when the job failed")
    notes: list[str] = []
    links: dict[str, str | dict[str, str]]


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds") if t else None


def job_resource(job: Job) -> SegmentationJob:
    base = f"/v1/segmentations/{job.id}"
    options = {k: v for k, v in job.options.items() if k != "request_id"}
    links: dict = {"self": base}
    if job.status == "done":
        links |= {"result": f"{base}/result", "preview": f"{base}/preview",
                  "masks": {s: f"{base}/masks/{s}" for s in job.options["structures"]}}
        links |= {k: f"{base}/dicom/{k}" for k in ("rtstruct", "seg") if k in (job.result or {}).get("files", {})}
    return SegmentationJob(id=job.id, status=job.status, created=_iso(job.created) or "", started=_iso(job.started),
                           finished=_iso(job.finished), options=options, progress=Progress(**job.progress),
                           result=job.result, error=job.error, notes=job.notes, links=links)


def _owned(queue: JobQueue, job_id: str, owner: str | None) -> Job:
    job = queue.get(job_id)
    if job is None or (owner is not None and job.owner != owner):
        raise Problem(404, "not-found", "Not found", f"no segmentation job {job_id!r} (it may have expired)")
    return job


def _input_name(head: bytes) -> str:
    if head[:2] == b"\x1f\x8b":
        return "ct.nii.gz"
    if head[:4] == b"PK\x03\x04":
        return "ct.zip"  # a DICOM series
    return "ct.nii"


async def form_options(
    request: Request,
    library: LibraryDep,
    structures: Annotated[str, Form(description="comma-separated structures",
                                    json_schema_extra={"pattern": r"\S"})] = ",".join(DEFAULT_STRUCTURES),
    support_size: Annotated[int | None, Form(ge=1, le=256, description="support slices per member")] = None,
    ensemble: Annotated[int | None, Form(ge=1, le=16, description="support subsets averaged")] = None,
    threshold: Annotated[float | None, Form(gt=0, lt=1)] = None,
    probabilities: Annotated[bool, Form(description="include probability maps in the result")] = False,
    axial_search: Annotated[Literal["coarse", "all"], Form(
        description="coarse: search where localisation places each structure; all: every body slice (also a scan "
                    "too short to place)")] = "coarse",
    roi_names: Annotated[Literal["display", "tg263"], Form(
        description="ROI names in the RTSTRUCT: display names, or TG-263 names where a structure has one")] = "display",
) -> SegmentOptions:
    """The upload form's options, with every structure checked against the loaded sets: a structure without a
    support set is refused now, not by the worker."""
    sent = (await request.form()).get("structures", structures)  # FastAPI turns an empty field into the default
    if not str(sent).replace(",", " ").strip():
        raise Problem(422, "invalid-option", "Invalid option", "structures: give at least one structure name",
                      errors=[{"field": "body.structures", "message": "empty"}])
    names = library.catalogue.parse(structures)
    library.support_for(names)
    return SegmentOptions(structures=names, support_size=support_size, ensemble=ensemble, threshold=threshold,
                          probabilities=probabilities, axial_search=axial_search, roi_names=roi_names)


def _stored(options: SegmentOptions, extra: dict) -> dict:
    """What the job keeps of its options: what the request set (the job resource shows it; the worker validates
    it back, the rest at their defaults), the job-only keys in `extra`, and the request id for the worker's log
    lines."""
    return options.model_dump(mode="json", exclude_unset=True) | extra | {"request_id": request_id.get()}


async def _receive_upload(file: UploadFile, job_id: str, series_uid: str | None, settings: ServerSettings,
                          results: ResultStore, decodes: threading.BoundedSemaphore) -> str:
    """Store the upload where the worker finds it and check it with the pipeline's own reader
    (AUTOCONTOUR_MAX_VOXELS is checked from the NIfTI or DICOM headers, before anything is inflated or
    decoded); returns its input name. A refused upload leaves nothing behind."""
    input_name = _input_name(await file.read(4))
    await file.seek(0)
    path = results.upload_path(job_id, input_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb") as out:
            while chunk := await file.read(COPY_CHUNK):
                out.write(chunk)
        if path.stat().st_size == 0:
            raise InputImageError("the uploaded file is empty (0 bytes)")
        await run_in_threadpool(decode_limited, decodes, settings, read_input, path, settings, series_uid)
    except BaseException:  # refused, or anything unexpected: no upload left behind
        results.delete_upload(job_id)
        raise
    return input_name


async def _enqueue(queue: JobQueue, results: ResultStore, settings: ServerSettings, options: dict,
                   owner: str | None, input_name: str, job_id: str) -> Job:
    try:
        return await run_in_threadpool(queue.submit, options, owner, input_name, job_id)
    except QueueFull:  # filled up while this upload was read and checked
        results.delete_upload(job_id)
        raise queue_full(settings.max_queue, settings.retry_after_s) from None
    except QueueUnavailable as exc:
        results.delete_upload(job_id)
        raise Problem(503, "queue-unavailable", "Queue unavailable", f"{exc}; retry later",
                      headers={"Retry-After": str(settings.retry_after_s)}) from None


@router.post("", status_code=202, response_model=SegmentationJob,
             responses={200: {"content": {"application/zip": {}}, "description": "with wait=true: the result zip"},
                        **problem_responses(400, 409, 413, 422, 500, 503, described={
                            409: "with wait=true: the job was cancelled",
                            413: "the upload is larger than AUTOCONTOUR_MAX_UPLOAD_BYTES",
                            422: "an invalid CT (unreadable, truncated, not 3D, not in HU, more voxels than "
                                 "AUTOCONTOUR_MAX_VOXELS...), structure or option, or a missing file",
                            500: "with wait=true: the job failed (its problem document; an input error the "
                                 "worker found has its own 4xx status)"})})
async def submit(
    settings: SettingsDep,
    queue: QueueDep,
    results: ResultsDep,
    decodes: DecodesDep,
    options: Annotated[SegmentOptions, Depends(form_options)],
    file: Annotated[UploadFile | None, File(description="CT volume (.nii or .nii.gz, in Hounsfield units) or a "
                                                        "zip of one DICOM CT series")] = None,
    study_uid: Annotated[str | None, Form(description="instead of a file: a study in the configured PACS")] = None,
    series_uid: Annotated[str | None, Form(description="the CT series to segment when the study (or the DICOM "
                                                       "zip) has several")] = None,
    push_to_pacs: Annotated[bool, Form(description="store the RTSTRUCT and SEG back into the PACS")] = False,
    wait: Annotated[bool, Query(description="wait for the result and return the zip")] = False,
    owner: str | None = require("segment"),
):
    """Queue a CT (upload, DICOM zip, or PACS study) for segmentation. Answers 202 with the job and its Location."""
    job_id = uuid.uuid4().hex
    if file is None and study_uid is None:
        raise Problem(422, "missing-field", "Missing field", "missing field 'file' (or 'study_uid' with a PACS)")
    if file is not None and study_uid is not None:
        raise Problem(422, "invalid-option", "Invalid option", "give either 'file' or 'study_uid', not both")
    if file is None:
        if not settings.pacs_url:
            raise Problem(422, "no-pacs", "No PACS configured", "this server has no PACS (AUTOCONTOUR_PACS_URL)")
        stored = _stored(options, {"pacs": {"study_uid": study_uid, "series_uid": series_uid, "push": push_to_pacs}})
        input_name = "series"
    else:
        options = options.model_copy(update={"series_uid": series_uid})
        input_name = await _receive_upload(file, job_id, series_uid, settings, results, decodes)
        stored = _stored(options, {})
    job = await _enqueue(queue, results, settings, stored, owner, input_name, job_id)
    if wait:
        return await _waited(queue, results, settings, job.id)
    return JSONResponse(job_resource(job).model_dump(), status_code=202, headers=_location(job.id))


def _location(job_id: str) -> dict[str, str]:
    return {"Location": f"/v1/segmentations/{job_id}"}


async def _waited(queue: JobQueue, results: ResultStore, settings: ServerSettings, job_id: str) -> Response:
    """The answer of `wait=true`: the result zip, or the job's problem (its resource when it is still running)."""
    job = await _wait(queue, settings, job_id)
    location = _location(job.id)
    if job.status == "done":
        return FileResponse(results.zip_path(job.id), media_type="application/zip",
                            filename=f"autocontour-{job.id}.zip", headers=location | {"X-Job-Id": job.id})
    if job.status == "cancelled":
        raise Problem(409, "cancelled", "Cancelled", "the job was cancelled", headers=location)
    if job.status == "failed":
        error = job.error or {}
        raise Problem(error.get("status", 500), error.get("type", "failed").rsplit(":", 1)[-1],
                      error.get("title", "Segmentation failed"), error.get("detail", "the job failed"),
                      headers=location)
    return JSONResponse(job_resource(job).model_dump(), status_code=202, headers=location)


async def _wait(queue: JobQueue, settings: ServerSettings, job_id: str) -> Job:
    deadline = asyncio.get_running_loop().time() + settings.wait_timeout_s
    job = _found(queue.get(job_id))
    while job.status not in FINAL and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.25)
        job = _found(await run_in_threadpool(queue.get, job_id))
    return job


def _found(job: Job | None) -> Job:
    if job is None:  # removed while waited for (it expired or was deleted)
        raise Problem(404, "not-found", "Not found", "the job was removed while waited for")
    return job


@router.get("", response_model=list[SegmentationJob], responses=problem_responses(422))
def list_jobs(queue: QueueDep, jobs: JobsDep, owner: str | None = require("read"),
              limit: int = Query(50, ge=1, le=500)):
    """The caller's jobs, newest first, each as up to date as `GET /v1/segmentations/{id}` shows it."""
    return [job_resource(j) for j in queue.refresh(jobs.list(owner, limit))]


@router.get("/{job_id}", response_model=SegmentationJob, responses=problem_responses(404))
def get_job(queue: QueueDep, job_id: str, owner: str | None = require("read")):
    """Status, progress (slices done of total, per structure), timings and errors."""
    return job_resource(_owned(queue, job_id, owner))


@router.delete("/{job_id}", status_code=202, response_model=SegmentationJob,
               responses={204: {"description": "a finished job and its results were removed"},
                          **problem_responses(404)})
def delete_job(queue: QueueDep, jobs: JobsDep, results: ResultsDep, job_id: str,
               owner: str | None = require("segment")):
    """Cancel a queued or running job (202), or remove a finished one and its results (204)."""
    job = _owned(queue, job_id, owner)
    if job.status in FINAL:
        results.delete(job.id)
        jobs.delete(job.id)
        return Response(status_code=204)
    queue.cancel(job.id)
    return JSONResponse(job_resource(_found(queue.get(job.id))).model_dump(), status_code=202)


FINISHED_ONLY = problem_responses(404, 409)  # routes that serve a finished job's files


def finished(queue: JobQueue, job_id: str, owner: str | None) -> Job:
    job = _owned(queue, job_id, owner)
    if job.status != "done":
        raise Problem(409, "not-ready", "Result not ready", f"the job is {job.status}",
                      headers={"Retry-After": "5"} if job.status not in FINAL else None)
    return job


@router.get("/{job_id}/result", response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}}}, **FINISHED_ONLY})
def get_result(queue: QueueDep, results: ResultsDep, job_id: str, owner: str | None = require("read")):
    """A zip: one NIfTI mask per structure, summary.json, preview.png (and probability maps if asked)."""
    job = finished(queue, job_id, owner)
    return FileResponse(results.zip_path(job.id), media_type="application/zip",
                        filename=f"autocontour-{job.id}.zip")


@router.get("/{job_id}/summary", responses=FINISHED_ONLY)
def get_summary(queue: QueueDep, results: ResultsDep, job_id: str, owner: str | None = require("read")):
    """The full summary.json of a finished job."""
    job = finished(queue, job_id, owner)
    return FileResponse(results.result_dir(job.id) / SUMMARY, media_type="application/json")


@router.get("/{job_id}/preview", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}, **FINISHED_ONLY})
def get_preview(queue: QueueDep, results: ResultsDep, job_id: str, owner: str | None = require("read")):
    job = finished(queue, job_id, owner)
    return FileResponse(results.result_dir(job.id) / PREVIEW, media_type="image/png")


@router.get("/{job_id}/masks/{structure}", response_class=FileResponse,
            responses={200: {"content": {"application/gzip": {}}}, **FINISHED_ONLY})
def get_mask(queue: QueueDep, results: ResultsDep, job_id: str, structure: str,
             version: Annotated[int | None, Query(ge=0, le=1_000_000, description="an older version (0: the first: "
                                                  "segment's draft, or the first propagation)")] = None,
             owner: str | None = require("read")):
    """One structure's mask (uint8 NIfTI on the CT's grid): its newest version (segment's draft until it is
    edited), or `?version=N`."""
    job = finished(queue, job_id, owner)
    return FileResponse(mask_path(job, results, structure, version), media_type="application/gzip",
                        filename=f"{structure}.nii.gz")


@router.get("/{job_id}/dicom/{kind}", response_class=FileResponse,
            responses={200: {"content": {"application/dicom": {}}}, **FINISHED_ONLY})
def get_dicom(queue: QueueDep, results: ResultsDep, job_id: str, kind: str, owner: str | None = require("read")):
    """The RTSTRUCT (kind=rtstruct) or DICOM-SEG (kind=seg) of a job whose input was DICOM."""
    job = finished(queue, job_id, owner)
    name = (job.result or {}).get("files", {}).get(kind) if kind in ("rtstruct", "seg") else None
    if not name:
        raise Problem(404, "not-found", "Not found", f"the job has no {kind!r} output (its input was not DICOM)")
    return FileResponse(results.result_dir(job.id) / name, media_type="application/dicom",
                        filename=name)
