"""Editing a finished job: one structure propagated from drawn slices or corrected, as a new version.

The same steps run wherever the network is: in the server process with the local queue (under the
segmenter's engine lock, so an edit never runs the network while a job does), or in a Celery worker
(`autocontour.server.celery_queue`), which reads the drawn mask from the shared data folder. The API checks
the request first in both modes, so a bad mask is refused without waiting for the network.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import BaseModel

from autocontour.catalogue import NAME_PATTERN
from autocontour.config import Settings
from autocontour.dicom.reading import read_input
from autocontour.engine.runner import Engine
from autocontour.errors import AutocontourError
from autocontour.export import mask_file
from autocontour.pipeline.editing import Edit, apply_edit
from autocontour.pipeline.outputs import REVIEW_CT
from autocontour.pipeline.propagation import DrawnCase, read_drawn_mask
from autocontour.pipeline.versions import StructureVersions, Version, note_in_summary
from autocontour.server.jobs import Job, ResultStore
from autocontour.server.problems import Problem, from_error

log = logging.getLogger(__name__)
STRUCTURE_NAME = re.compile(NAME_PATTERN)


class EditRequest(BaseModel):
    """An edit as it travels to whoever runs the network (a Celery task's argument, as JSON)."""

    job_id: str
    structure: str  # checked and normalised
    drawn: str  # the drawn mask's file name in the job's upload folder
    slices: list[int] | None = None
    ends_drawn: bool = False
    author: str | None = None


class NotEditable(AutocontourError):
    """A finished job that kept no CT to edit on."""

    code = "not-editable"
    http_status = 409


class EditTimeout(Exception):
    """Nothing ran the edit in time: the network stayed busy, or no Celery worker answered."""


def read_edit(results: ResultStore, request: EditRequest, settings: Settings) -> Edit:
    """The CT the job kept and the drawn mask, checked (grid, slices, a drawing at all): an `Edit`.

    A structure the job already holds (segmented or edited) is corrected, so a listed slice left empty
    erases it there; a new one is propagated from the drawn slices alone, which must hold something."""
    result_dir = results.result_dir(request.job_id)
    ct_path = result_dir / REVIEW_CT
    if not ct_path.is_file():
        raise NotEditable("this job kept no CT to edit on (a job finished by an older version): submit the CT "
                          "again")
    ct, _ = read_input(ct_path, settings)
    mask = read_drawn_mask(results.upload_path(request.job_id, request.drawn), ct, settings)
    existing = (StructureVersions(result_dir, request.structure).latest() is not None
                or (result_dir / mask_file(request.structure)).is_file())
    case = DrawnCase.of(ct, mask, request.slices, erasing=existing)
    return Edit(request.structure, case, request.ends_drawn, request.author)


def run_edit(engine: Engine, results: ResultStore, request: EditRequest, settings: Settings,
             edit: Edit | None = None) -> dict:
    """Apply the edit (checked again unless `edit` is the checked one) and name the new version in the summary;
    returns {"version": ...}, or {"error": problem} for an input the checks refuse."""
    try:
        edit = edit or read_edit(results, request, settings)
        result_dir = results.result_dir(request.job_id)
        version = apply_edit(engine, result_dir, edit)
        note_in_summary(result_dir, request.structure, version)
    except AutocontourError as exc:
        return {"error": from_error(exc)}
    log.info("job %s: edit made version %d in %.1f s", request.job_id, version.version, version.seconds)
    return {"version": version.model_dump()}


def edit_outcome(answer: dict) -> Version:
    """The version an edit made, or its problem raised."""
    if "error" in answer:
        error = answer["error"]
        raise Problem(error["status"], error["type"].rsplit(":", 1)[-1], error["title"], error["detail"])
    return Version.model_validate(answer["version"])


def drawn_upload_name(head: bytes, token: str) -> str:
    """The drawn mask's name in the job's upload folder (.nii or .nii.gz by its first bytes)."""
    return f"drawn-{token}.nii.gz" if head[:2] == b"\x1f\x8b" else f"drawn-{token}.nii"


def source_series(results: ResultStore, job_id: str) -> Path | None:
    """A DICOM job's kept input series (a zip or a folder), None for a NIfTI job."""
    folder = results.source_dir(job_id)
    found = sorted(folder.iterdir()) if folder.is_dir() else []
    return found[0] if found else None


def mask_path(job: Job, results: ResultStore, structure: str, version: int | None) -> Path:
    """A structure's newest version (segment's draft until it is edited), or version `version`; else 404."""
    if not STRUCTURE_NAME.match(structure):
        raise Problem(404, "not-found", "Not found", f"the job has no structure {structure[:64]!r}")
    store = StructureVersions(results.result_dir(job.id), structure)
    latest = store.latest()
    if latest is None and structure not in job.options["structures"]:
        raise Problem(404, "not-found", "Not found", f"the job has no structure {structure!r}")
    newest = 0 if latest is None else latest.version
    wanted = newest if version is None else version
    if wanted > newest:
        raise Problem(404, "not-found", "Not found", f"{structure} has no version {wanted} (versions 0..{newest})")
    return results.result_dir(job.id) / mask_file(structure) if latest is None else store.mask_path(wanted)
