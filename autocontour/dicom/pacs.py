"""A PACS over DICOMweb: find and fetch a CT series (QIDO-RS, WADO-RS), store results (STOW-RS).

dicomweb-client speaks the protocol; this module adds the choices a
department needs: which series of a study is the planning CT (refuse to
guess between several), where the files go, and clear errors when the
server is unreachable or the study is not there.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pydicom.errors
import requests
from dicomweb_client.api import DICOMwebClient

from autocontour.dicom.roi import ALLOW_UNAPPROVED_FLAG, approval_refusal
from autocontour.errors import AutocontourError, InputImageError, SupportSetError


class PacsError(AutocontourError):
    code = "pacs-error"
    http_status = 502


def connect(url: str, username: str | None = None, password: str | None = None) -> DICOMwebClient:
    session = requests.Session()
    if username:
        session.auth = (username, password or "")
    return DICOMwebClient(url=url.rstrip("/"), session=session)


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


def find_ct_series(client: DICOMwebClient, study_uid: str, series_uid: str | None = None) -> str:
    """The one CT series of a study to segment (or the one named)."""
    try:
        found = client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "CT"})
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 404:
            _require_dicomweb(client)
            raise InputImageError(f"study {study_uid} is not in the PACS") from exc
        raise PacsError(f"the PACS refused the search: {exc}") from exc
    except requests.RequestException as exc:
        raise PacsError(f"cannot reach the PACS: {exc}") from exc
    uids = [_value(s, "0020000E") for s in found]
    if series_uid:
        if series_uid not in uids:
            raise InputImageError(f"series {series_uid} is not a CT series of study {study_uid}")
        return series_uid
    if not uids:
        if not client.search_for_series(study_instance_uid=study_uid):
            raise InputImageError(f"study {study_uid} is not in the PACS")
        raise InputImageError(f"study {study_uid} has no CT series")
    if len(uids) > 1:
        raise InputImageError(f"study {study_uid} has {len(uids)} CT series; name one with its series UID: "
                              + ", ".join(uids))
    return uids[0]


def fetch_series(client: DICOMwebClient, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
    """Download every instance of a series into a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        instances = client.retrieve_series(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                           media_types=(("application/dicom", "*"),))  # as stored: no transcoding
    except requests.RequestException as exc:
        raise PacsError(f"cannot retrieve series {series_uid}: {exc}") from exc
    paths = []
    for i, ds in enumerate(instances):
        path = folder / f"{i:05d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def _require_dicomweb(client: DICOMwebClient) -> None:
    """Refuse a URL that is a server but not its DICOMweb root (Orthanc's own REST root answers /studies with
    a list of its internal ids, and every study then looks missing)."""
    try:
        found = client.search_for_studies(limit=1)
    except requests.RequestException as exc:
        raise PacsError(f"{client.base_url} is not a DICOMweb root (a QIDO-RS study query failed: "
                        f"{_status(exc)}); give the DICOMweb root, e.g. http://orthanc:8042/dicom-web") from exc
    if not all(isinstance(item, dict) for item in found):
        raise PacsError(f"{client.base_url} is not a DICOMweb root (its /studies is not QIDO-RS); give the DICOMweb "
                        "root, e.g. http://orthanc:8042/dicom-web")


def _status(error: requests.RequestException) -> str:
    response = getattr(error, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(error).__name__


def find_studies(client: DICOMwebClient, patient_id: str | None = None, accession: str | None = None,
                 study_date: str | None = None) -> list[dict[str, str]]:
    """Studies that match a patient ID, an accession number and/or a study date (YYYYMMDD or a range
    YYYYMMDD-YYYYMMDD), QIDO-RS: for finding a study when its UID is not at hand."""
    filters = {key: value for key, value in (("PatientID", patient_id), ("AccessionNumber", accession),
                                               ("StudyDate", study_date)) if value}
    if not filters:
        raise InputImageError("give a patient ID, an accession number or a study date to search for")
    try:
        found = client.search_for_studies(search_filters=filters, fields=["ModalitiesInStudy", "StudyDescription"])
    except requests.RequestException as exc:
        raise PacsError(f"the PACS refused the study search: {exc}") from exc
    fields = {"study_uid": "0020000D", "date": "00080020", "accession": "00080050", "patient_id": "00100020",
              "description": "00081030", "modalities": "00080061"}
    return [{name: ",".join(str(v) for v in item.get(tag, {}).get("Value", [])) for name, tag in fields.items()}
            for item in found]


def store(client: DICOMwebClient, files: list[Path]) -> None:
    """STOW-RS the given DICOM files (an RTSTRUCT and a SEG) into the PACS; anything else is refused first."""
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(str(path)))
        except (pydicom.errors.InvalidDicomError, OSError) as exc:
            raise InputImageError(f"{path.name} is not a DICOM file: only DICOM files (rtstruct.dcm, seg.dcm) "
                                  "can be stored in a PACS") from exc
    try:
        client.store_instances(datasets)
    except requests.RequestException as exc:
        raise PacsError(f"the PACS refused to store the results: {exc}") from exc


def fetch_contoured_case(client: DICOMwebClient, study_uid: str, folder: Path,
                         allow_unapproved: bool = False) -> tuple[Path, Path]:
    """A contoured planning CT from the PACS, for a support case: (CT series folder, RTSTRUCT file).

    The RTSTRUCT must reference the CT series' frame of reference. When the study holds several structure
    sets, the newest that a clinician approved is taken (clinics re-export after review): a draft, such as
    the one `pacs pull --push` stored, is passed over, and if nothing else is there the study is refused
    (unless `allow_unapproved`, when the newest of all is taken).
    """
    series_uid = find_ct_series(client, study_uid)
    ct_folder = folder / "ct"
    fetch_series(client, study_uid, series_uid, ct_folder)
    frame = str(pydicom.dcmread(str(next(ct_folder.iterdir())), stop_before_pixels=True).FrameOfReferenceUID)
    candidates = _structure_sets_on(client, study_uid, frame, folder)
    if not candidates:
        raise InputImageError(f"study {study_uid} has no RTSTRUCT on its CT series' frame of reference")
    approved = [c for c in candidates if c[2] is None]
    if not approved and not allow_unapproved:
        raise SupportSetError(f"study {study_uid}: no RTSTRUCT on its CT that a clinician approved (the newest: "
                              f"{max(candidates)[2]}); {ALLOW_UNAPPROVED_FLAG} takes it anyway")
    return ct_folder, max(approved or candidates)[1]


def _structure_sets_on(client: DICOMwebClient, study_uid: str, frame: str,
                       folder: Path) -> list[tuple[str, Path, str | None]]:
    """The study's RTSTRUCTs on the frame of reference, fetched into `folder`: (date and time, file,
    why it may not be a support case or None)."""
    try:
        found = client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": "RTSTRUCT"})
    except requests.RequestException as exc:
        raise PacsError(f"cannot search the PACS for structure sets: {exc}") from exc
    candidates: list[tuple[str, Path, str | None]] = []
    for index, item in enumerate(found):
        for path in fetch_series(client, study_uid, _value(item, "0020000E"), folder / f"rtstruct-{index}"):
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            frames = {str(f.FrameOfReferenceUID) for f in getattr(ds, "ReferencedFrameOfReferenceSequence", [])}
            if frame in frames:
                when = str(getattr(ds, "StructureSetDate", "")) + str(getattr(ds, "StructureSetTime", ""))
                candidates.append((when, path, approval_refusal(ds)))
    return candidates
