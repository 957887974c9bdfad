"""Where a support case comes from, and which cases may become one.

A support case teaches the network what the clinic draws, so a set must only
learn from contours a clinician stands behind, and must learn each scan once:

- an RTSTRUCT whose RT Approval status is UNAPPROVED or REJECTED, or an
  autocontour draft, is refused unless the user says `--allow-unapproved`
  (`autocontour.dicom.roi.approval_refusal`);
- a scan already in the set (the same fingerprint, however it is stored) is
  refused: a duplicate would count one patient twice.

Each case's provenance (file, PACS study or corrected result; the RTSTRUCT's
approval and reviewer) goes into the manifest, without a patient identifier or
a file name: the mask file is named by its SHA-256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from autocontour.errors import KnownScanError, SupportSetError
from autocontour.support.store import CaseProvenance, SourceCase

CaseKind = Literal["file", "pacs", "result"]


@dataclass(frozen=True)
class CaseFiles:
    """A case as given: its CT (NIfTI, or a DICOM series folder or zip), its mask and where they came from."""

    ct: Path
    mask: Path
    kind: CaseKind = "file"
    study_uid: str | None = None  # kind "pacs"
    job_id: str | None = None  # kind "result": the server job whose approved version it is
    approved_by: str | None = None  # kind "result": who approved that version (the API key's name)
    approved_on: str | None = None  # kind "result": when (ISO 8601, UTC)


def as_case_files(case: tuple[Path, Path] | CaseFiles) -> CaseFiles:
    """A (CT, mask) pair is a case from files."""
    return case if isinstance(case, CaseFiles) else CaseFiles(Path(case[0]), Path(case[1]))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def case_provenance(case: CaseFiles, case_id: str, allow_unapproved: bool = False) -> CaseProvenance:
    """The case's provenance; an RTSTRUCT that no clinician approved is refused unless `allow_unapproved`."""
    from autocontour.support.build import is_rtstruct  # build imports this module

    fields: dict[str, Any] = {}
    if is_rtstruct(case.mask):
        from autocontour.dicom.roi import ALLOW_UNAPPROVED_FLAG, approval_refusal, read_rtstruct_file

        rtstruct = read_rtstruct_file(case.mask)
        refusal = approval_refusal(rtstruct)
        if refusal and not allow_unapproved:
            raise SupportSetError(f"the RTSTRUCT of {case_id} cannot be a support case: {refusal} (a support case "
                                  f"teaches the network what to draw; {ALLOW_UNAPPROVED_FLAG} takes it anyway)")
        fields = _approval_fields(rtstruct) | {"allowed_unapproved": refusal is not None}
    if case.approved_by is not None:  # a result approved on the review page: the approval is the server's record
        fields |= {"approval": "APPROVED", "approved_by": case.approved_by, "approved_on": case.approved_on}
    return CaseProvenance(kind=case.kind, added=datetime.now(UTC).isoformat(timespec="seconds"),
                          mask_sha256=file_sha256(case.mask), study_uid=case.study_uid, job_id=case.job_id,
                          **fields)


def _approval_fields(rtstruct) -> dict[str, Any]:
    """The RTSTRUCT's instance UID and what its RT Approval module says (the reviewer only when approved)."""
    status = str(getattr(rtstruct, "ApprovalStatus", "")).strip().upper() or None
    fields: dict[str, Any] = {"rtstruct_uid": str(getattr(rtstruct, "SOPInstanceUID", "")) or None,
                                 "approval": status}
    if status == "APPROVED":
        fields["approved_by"] = str(getattr(rtstruct, "ReviewerName", "")) or None
        fields["approved_on"] = (str(getattr(rtstruct, "ReviewDate", "")) + str(getattr(rtstruct, "ReviewTime", ""))
                                 ) or None
    return fields


def known_scans(existing: Iterable[SourceCase]) -> dict[str, str]:
    """Fingerprint -> how to name the case that has it, for `refuse_known_scan`."""
    return {c.fingerprint: f"{c.case}, already in the set" for c in existing}


def refuse_known_scan(case_id: str, scan_fingerprint: str, known: dict[str, str]) -> None:
    """Refuse a scan that is already a case (of the set, or given twice), however it is stored; else note it."""
    if scan_fingerprint in known:
        raise KnownScanError(f"{case_id} is the same scan as {known[scan_fingerprint]} (same fingerprint, however "
                              "it is stored): a scan can be a support case only once")
    known[scan_fingerprint] = case_id
