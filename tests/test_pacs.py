"""PACS failures said out loud, and finding a study without its UID, against a real Orthanc."""

from __future__ import annotations

import json

import httpx
import pydicom
import pytest
from conftest import DATA
from orthanc import pacs_copy, start_orthanc, upload_folder

from autocontour.cli import main
from autocontour.dicom import pacs
from autocontour.errors import AutocontourError

SERIES = DATA / "dicom_ct"


@pytest.fixture(scope="module")
def orthanc():
    server = start_orthanc()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("pacs")
    uid = pacs_copy(SERIES, folder)
    for path in folder.iterdir():  # a patient ID and an accession number to search by
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.AccessionNumber = "PACS-TEST-7", "ACC-42"
        ds.save_as(path, enforce_file_format=True)
    upload_folder(orthanc, folder)
    return uid


def test_the_shipped_dicom_example_uploads_to_orthanc_as_it_is():
    own = start_orthanc()  # a PACS of its own: the module's holds one study, which the queries below expect
    try:
        for path in sorted(SERIES.glob("CT.*")):  # the slices, as shipped (LICENSE and notes beside them)
            assert httpx.post(f"{own.url}/instances", content=path.read_bytes()).status_code == 200, path.name
        first = pydicom.dcmread(next(SERIES.glob("CT.*")), stop_before_pixels=True)
        client = pacs.connect(own.dicomweb)
        assert pacs.find_ct_series(client, str(first.StudyInstanceUID)) == str(first.SeriesInstanceUID)
        instances = client.search_for_instances(str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
        assert len(instances) == len(list(SERIES.glob("CT.*")))
    finally:
        own.stop()


def test_a_server_root_instead_of_its_dicomweb_root_is_named_as_such(orthanc, study):
    with pytest.raises(AutocontourError, match="not a DICOMweb root"):
        pacs.find_ct_series(pacs.connect(orthanc.url), study)


def test_a_study_is_found_by_patient_id_accession_number_or_date(orthanc, study):
    client = pacs.connect(orthanc.dicomweb)
    for query in ({"patient_id": "PACS-TEST-7"}, {"accession": "ACC-42"}, {"study_date": "20221201-20221231"}):
        found = pacs.find_studies(client, **query)
        assert [s["study_uid"] for s in found] == [study], query
        assert found[0]["modalities"] == "CT"
    assert pacs.find_studies(client, patient_id="NOBODY") == []


def test_pushing_something_that_is_not_dicom_is_one_line_and_exit_2(orthanc, tmp_path, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"structures": {}}))
    code = main(["pacs", "push", "--url", orthanc.dicomweb, str(summary)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "summary.json is not a DICOM file" in err


def test_pacs_find_prints_the_study_uid_to_pull(orthanc, study, capsys):
    assert main(["pacs", "find", "--url", orthanc.dicomweb, "--accession", "ACC-42"]) == 0
    out, err = capsys.readouterr()
    assert out.split()[0] == study and "1 study found" in err
    assert main(["pacs", "find", "--url", orthanc.dicomweb]) == 2  # no criterion: one line, exit 2


def test_pull_with_push_that_draws_nothing_says_nothing_was_pushed(orthanc, study, tmp_path, small_weights, capsys):
    """The 20-slice upper-abdomen slab is too short to place: nothing is drawn, so there is nothing to store."""
    code = main(["pacs", "pull", "--url", orthanc.dicomweb, "--study", study, "--out", str(tmp_path / "out"),
                 "--push", "--weights", str(small_weights), "--support-size", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "DRAFT contours" in out and "Bladder" in out  # the per-structure table
    assert "nothing pushed: no structure has any voxel" in err
