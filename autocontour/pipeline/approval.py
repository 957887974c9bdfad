"""Approve a result: its files then hold the structures' newest versions, and say who approved them and when.

Approval is a record, not a lock: an edit after it is still a new version (nothing is overwritten), but the
result's top-level masks, zip and DICOM outputs stay what was approved until the next approval
(`StructureVersions.add` publishes nothing once a result is approved), and summary.json's `approval` names
the versions it covers, so what was approved is never in doubt.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from autocontour.catalogue import StructureDefinition, default_definition
from autocontour.dicom.series import DicomSeries
from autocontour.export import SUMMARY, mask_file
from autocontour.pipeline.editing import current_version
from autocontour.pipeline.versions import StructureVersions, drawn_definition, note_in_summary


class Approval(BaseModel):
    """Who approved which version of each structure, and when: summary.json's `approval` entry."""

    by: str = Field(description="the API key's name that approved (anonymous on a server without keys)")
    at: str = Field(description="ISO 8601 time, UTC")
    versions: dict[str, int] = Field(description="structure -> the version approved (its newest at approval)")
    files: list[str] = Field(description="the result's files that now hold the approved versions")


def approve(result_dir: Path, structures: list[str], by: str, series: DicomSeries | None,
            roi_names: str = "display") -> Approval:
    """Publish each structure's newest version (segment's draft counts as version 0), rewrite the RTSTRUCT
    (marked APPROVED by `by`) and DICOM-SEG where the input was a DICOM `series`, and record the approval."""
    result_dir, moment = Path(result_dir), datetime.now(UTC)
    versions = {}
    for name in structures:
        version = current_version(result_dir, name)
        if version is not None:
            StructureVersions(result_dir, name).publish(version.version)
            note_in_summary(result_dir, name, version)
            versions[name] = version.version
    files = [mask_file(n) for n in versions]
    if series is not None:
        files += _write_dicom(result_dir, versions, series, by, moment, roi_names)
    approval = Approval(by=by, at=moment.strftime("%Y-%m-%dT%H:%M:%SZ"), versions=versions, files=files)
    _record(result_dir, approval)
    return approval


def _write_dicom(result_dir: Path, versions: dict[str, int], series: DicomSeries, by: str, moment: datetime,
                 roi_names: str) -> list[str]:
    """The RTSTRUCT and SEG of the approved masks (none when every mask is empty, as segment writes none)."""
    from autocontour.dicom.outputs import RTSTRUCT_FILE, SEG_FILE, write_rtstruct, write_seg

    masks = input_grid_masks(result_dir, list(versions))
    if not any(m.any() for m in masks.values()):
        return []
    summary = _summary(result_dir)
    definitions = {n: _definition(result_dir, summary, n) for n in masks}
    descriptions = {n: f"approved version {v}" for n, v in versions.items()}
    local = moment.astimezone()  # DICOM dates and times are local
    write_rtstruct(series, masks, result_dir / RTSTRUCT_FILE, descriptions, definitions, roi_names,
                   approved_by=by, approved_at=local.replace(tzinfo=None))
    support_sets = {n: s.get("support_set", {}) for n, s in summary.get("structures", {}).items()}
    write_seg(series, masks, result_dir / SEG_FILE, summary.get("model", {}), support_sets, definitions)
    return [RTSTRUCT_FILE, SEG_FILE]


def _definition(result_dir: Path, summary: dict[str, Any], name: str) -> StructureDefinition:
    """The structure as segment described it; a structure only drawn (propagated from scratch) as the reviewer
    named and coloured it, else a plain organ of that name."""
    known = summary.get("structures", {}).get(name)
    if known:
        return StructureDefinition.model_validate(known["definition"])
    return drawn_definition(result_dir, name) or default_definition(name)


def _summary(result_dir: Path) -> dict[str, Any]:
    path = result_dir / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(result_dir: Path, approval: Approval) -> None:
    summary = _summary(result_dir)
    summary["approval"] = approval.model_dump()
    path = result_dir / SUMMARY
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(summary, indent=1) + "\n")
    staging.replace(path)


def input_grid_masks(result_dir: Path, structures: list[str]) -> dict[str, np.ndarray]:
    """The result's top-level masks as arrays (slice, row, column) on the input's grid."""
    return {n: sitk.GetArrayFromImage(sitk.ReadImage(str(Path(result_dir) / mask_file(n)))) for n in structures}
