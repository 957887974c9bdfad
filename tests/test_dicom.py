"""DICOM in (folder, zip, PACS) and RTSTRUCT + DICOM-SEG out, with round trips and a real Orthanc."""

from __future__ import annotations

import json
import shutil
import stat
import time
import zipfile
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DATA, EXAMPLE_CT
from dicom_tools import DEFINITIONS, assert_segment_refuses, definition, write_ct_series
from orthanc import pacs_copy, start_orthanc, upload_folder
from pydicom import config as pydicom_config
from pydicom.valuerep import validate_value
from servers import start_server

from autocontour.cli import main
from autocontour.dicom.outputs import read_rtstruct, read_seg, write_rtstruct, write_seg
from autocontour.dicom.series import read_series, safe_extract
from autocontour.errors import InputImageError, OptionError

SERIES = DATA / "dicom_ct"
PROBLEM = "application/problem+json"
BOMB_LIMIT = 20_000_000  # AUTOCONTOUR_MAX_DICOM_BYTES in the bad-input tests: a real series zip stays under it


def validate_dataset(ds: pydicom.Dataset) -> None:
    """pydicom's value validation, strict, on every element (sequences included)."""
    for element in ds.iterall():
        if element.VR in ("SQ", "OB", "OW", "UN") or element.value is None:
            continue
        values = element.value if isinstance(element.value, (list, pydicom.multival.MultiValue)) else [element.value]
        for value in values:
            if element.VR in ("DS", "IS"):
                value = str(value)  # the string as written, which is what the 16-character limit is about
            validate_value(element.VR, value, pydicom_config.RAISE)


def assert_outputs_round_trip(series, out: Path) -> None:
    """The rtstruct.dcm and seg.dcm the pipeline wrote in `out`: valid DICOM (pydicom's validation, highdicom's
    reader), referencing the input series, and equal voxel for voxel to the NIfTI masks beside them."""
    rt_path, seg_path = out / "rtstruct.dcm", out / "seg.dcm"
    rt_ds = pydicom.dcmread(rt_path)
    validate_dataset(rt_ds)
    validate_dataset(pydicom.dcmread(seg_path))
    seg_ds = hd.seg.segread(str(seg_path))  # highdicom's reader accepts what the pipeline wrote
    for ds in (rt_ds, seg_ds):
        assert ds.StudyInstanceUID == series.study_uid and "autocontour draft" in ds.SeriesDescription
    assert rt_ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == series.frame_of_reference_uid
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    rt, seg = read_rtstruct(series, rt_path), read_seg(series, seg_path)
    found = 0
    for name, display in (("bladder", "Bladder"), ("anorectum", "Anorectum"), ("ctvn", "CTVn")):
        mask_path = out / f"{name}.nii.gz"
        if not mask_path.exists():
            continue
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path))).astype(bool)
        if mask.any():
            found += 1
            assert np.array_equal(rt[display], mask), name
            assert np.array_equal(seg[display], mask), name
        else:
            assert display not in rt and display not in seg, name  # empty structures are left out
    assert found and set(rt) == set(seg)


def _zip(path: Path, members: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in members.items():
            z.writestr(name, content.read_bytes() if isinstance(content, Path) else content)
    return path


def _slices(folder: Path = SERIES) -> list[Path]:
    return sorted(folder.glob("CT.*"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def bad_dicom_inputs(folder: Path, rtstruct: Path) -> dict[str, tuple[Path, str]]:
    """DICOM inputs every entry point must refuse: name -> (zip or folder, words its error must contain).

    The zip bomb needs AUTOCONTOUR_MAX_DICOM_BYTES=BOMB_LIMIT.
    """
    folder.mkdir(parents=True, exist_ok=True)
    slices = _slices()
    good = {p.name: p for p in slices}
    cases: dict[str, tuple[Path, str]] = {}
    cases["path traversal"] = (_zip(folder / "traversal.zip", good | {"../evil.dcm": b"x"}), "unsafe path")

    bomb = folder / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, z.open("ct/slice.dcm", "w") as f:
        for _ in range(32):
            f.write(bytes(1 << 20))  # 32 MiB of zeros
    assert bomb.stat().st_size < 100_000 and (32 << 20) > BOMB_LIMIT  # a ratio of ~1000:1
    cases["zip bomb"] = (bomb, "inflates to")

    link = folder / "symlink.zip"
    with zipfile.ZipFile(link, "w") as z:
        info = zipfile.ZipInfo("ct/slice0.dcm")
        info.create_system = 3  # unix
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
        for name, path in good.items():
            z.write(path, name)
    cases["symbolic link"] = (link, "symbolic link")

    mr = folder / "mr"
    mr.mkdir()
    for path in slices[:4]:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.save_as(mr / path.name)
    cases["MR, no CT"] = (_zip(folder / "mr.zip", {p.name: p for p in mr.iterdir()}), "no CT series found")
    cases["MR folder, no CT"] = (mr, "modalities present: MR")
    cases["RTSTRUCT only"] = (_zip(folder / "rtstruct.zip", {"rtstruct.dcm": rtstruct}), "no CT series found")

    mixed = {}
    for i, path in enumerate(slices):
        ds = pydicom.dcmread(path)
        if i % 2:
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # a second reconstruction
        mixed[path.name] = pydicom.filebase.DicomBytesIO()
        ds.save_as(mixed[path.name])
    cases["two CT series"] = (_zip(folder / "mixed.zip", {n: b.getvalue() for n, b in mixed.items()}),
                              "2 CT series found")
    gap = dict(good)
    del gap[slices[10].name]
    cases["missing slice"] = (_zip(folder / "gap.zip", gap), "a slice may be missing")

    corrupt = _zip(folder / "corrupt.zip", {slices[0].name: slices[0]})
    data = bytearray(corrupt.read_bytes())
    data[200] ^= 0xFF  # inside the deflated data of the only member
    corrupt.write_bytes(bytes(data))
    cases["corrupt member"] = (corrupt, "corrupt")
    return cases


@pytest.fixture(scope="module")
def bad_dicom(tmp_path_factory, series, known_masks):
    folder = tmp_path_factory.mktemp("bad_dicom")
    rtstruct = write_rtstruct(series, {"bladder": known_masks["bladder"]}, folder / "rtstruct.dcm", {}, DEFINITIONS)
    return bad_dicom_inputs(folder / "cases", rtstruct)


@pytest.fixture(scope="module")
def series():
    return read_series(SERIES)


@pytest.fixture(scope="module")
def pelvic_series(tmp_path_factory) -> Path:
    """The example pelvic CT as a DICOM series: what the pipeline tests segment (the 20-slice series is an
    upper-abdomen slab, too short to place: nothing is drawn on it by default)."""
    return write_ct_series(EXAMPLE_CT, tmp_path_factory.mktemp("pelvic") / "ct")


@pytest.fixture(scope="module")
def known_masks(series):
    hu = sitk.GetArrayFromImage(series.image)
    body = hu > -300
    box = np.zeros_like(body)
    box[3:15, 200:300, 150:260] = True
    return {"bladder": box, "ctvn": body & (np.arange(hu.shape[2])[None, None, :] > 256)}


def test_series_geometry_and_hu(series):
    image = series.image
    assert image.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert np.allclose(image.GetOrigin(), (-249.51171875, -437.51171875, -804.5))  # the most inferior slice first
    hu = sitk.GetArrayFromImage(image)
    assert hu.min() == -1024 and hu.max() > 1000  # rescale intercept applied
    assert [float(ds.ImagePositionPatient[2]) for ds in series.datasets] == sorted(
        float(ds.ImagePositionPatient[2]) for ds in series.datasets)
    assert not any("UID" in w for w in series.warnings)  # the shipped example has valid UIDs of its own
    assert [ds.SOPInstanceUID for ds in series.datasets] == [
        pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in series.files]


def test_a_series_whose_anonymiser_blanked_its_uids(tmp_path):
    """Study, series, SOP class and instance UIDs blanked in the datasets: the file meta's SOP UIDs (what a PACS
    indexes) are used, not made up, and the study and series get UIDs derived from the contents."""
    for path in sorted(SERIES.glob("CT.*")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.SOPClassUID = ""
        ds.save_as(tmp_path / path.name)
    series = read_series(tmp_path)
    assert any("deterministic UIDs" in w for w in series.warnings)
    assert [ds.SOPInstanceUID for ds in series.datasets] == [
        pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID for f in series.files]
    assert any("SOPInstanceUID are empty; those of their file meta are used" in w for w in series.warnings)
    assert read_series(tmp_path).series_uid == series.series_uid  # the same UIDs every time


def test_mixed_series_and_gaps_are_refused(tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(SERIES, mixed)
    for path in sorted(mixed.glob("CT.*"))[:5]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(path)
    with pytest.raises(InputImageError, match="2 CT series found, choose one with --series UID"):
        read_series(mixed)
    assert len(read_series(mixed, series_uid="1.2.3.4.5").datasets) == 5
    with pytest.raises(InputImageError, match=r"CT series 9\.9 is not in the input; CT series found: .*1\.2\.3\.4\.5 "
                                              r"\(5 slices\)"):
        read_series(mixed, series_uid="9.9")
    gap = tmp_path / "gap"
    shutil.copytree(SERIES, gap)
    sorted(gap.glob("CT.*"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[10].unlink()
    with pytest.raises(InputImageError, match="irregular slice spacing.*gaps at"):
        read_series(gap)
    with pytest.raises(InputImageError, match="no DICOM files"):
        read_series(DATA / "metrics" / "a_identical_blob")


def test_zip_input_and_unsafe_zips(tmp_path, capsys, small_weights):
    good = tmp_path / "series.zip"
    with zipfile.ZipFile(good, "w") as z:
        for path in SERIES.glob("CT.*"):
            z.write(path, f"export/{path.name}")
    assert read_series(good).image.GetSize() == (512, 512, 20)
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as z:
        z.writestr("../../etc/evil", b"x")
    with pytest.raises(InputImageError, match="unsafe path"):
        read_series(slip)
    with pytest.raises(InputImageError, match="more than the limit of 5"):
        read_series(good, max_files=5)
    with pytest.raises(InputImageError, match="inflates to"):
        safe_extract(good, tmp_path, max_bytes=1000)
    (tmp_path / "notzip.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InputImageError, match="not a readable zip"):
        read_series(tmp_path / "notzip.zip")
    with pytest.MonkeyPatch.context() as env:  # the settings the CLI, the API and its workers share
        env.setenv("AUTOCONTOUR_MAX_DICOM_FILES", "5")
        assert main(["segment", str(good), "--out", str(tmp_path / "o"), "--weights", str(small_weights)]) == 2
        assert "more than the limit of 5" in capsys.readouterr().err
        env.delenv("AUTOCONTOUR_MAX_DICOM_FILES")
        env.setenv("AUTOCONTOUR_MAX_VOXELS", "1000")  # checked from the headers, as for NIfTI
        assert main(["segment", str(good), "--out", str(tmp_path / "o"), "--weights", str(small_weights)]) == 2
        assert "more than the limit of 1,000" in capsys.readouterr().err
        env.setenv("AUTOCONTOUR_MAX_DICOM_BYTES", "lots")
        assert main(["segment", str(good), "--out", str(tmp_path / "o"), "--weights", str(small_weights)]) == 2
        assert "AUTOCONTOUR_MAX_DICOM_BYTES" in capsys.readouterr().err
    encrypted = tmp_path / "encrypted.zip"
    shutil.copy(good, encrypted)
    data = bytearray(encrypted.read_bytes())
    data[6] |= 1  # the first member's local header: "encrypted" (its central directory entry says it too)
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 1
    encrypted.write_bytes(bytes(data))
    with pytest.raises(InputImageError, match="encrypted member"):
        read_series(encrypted)


def test_rtstruct_round_trip_and_planning_system_values(series, known_masks, tmp_path):
    path = write_rtstruct(series, known_masks, tmp_path / "rtstruct.dcm", {"bladder": "draft, confidence 0.9"},
                          DEFINITIONS)
    ds = pydicom.dcmread(path)
    validate_dataset(ds)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == series.study_uid
    assert "autocontour draft" in ds.SeriesDescription and ds.ApprovalStatus == "UNAPPROVED"
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == series.frame_of_reference_uid
    rois = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    assert set(rois.values()) == {"Bladder", "CTVn"}
    kinds = {rois[o.ReferencedROINumber]: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert kinds == {"Bladder": "ORGAN", "CTVn": "CTV"}
    sop_uids = {str(d.SOPInstanceUID) for d in series.datasets}
    z_positions = {round(float(d.ImagePositionPatient[2]), 3) for d in series.datasets}
    for roi in ds.ROIContourSequence:
        assert list(roi.ROIDisplayColor) in ([255, 215, 0], [0, 200, 255])
        for contour in roi.ContourSequence:
            assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID in sop_uids
            raw = contour["ContourData"].value
            assert all(len(str(v)) <= 16 for v in raw)
            assert round(float(raw[2]), 3) in z_positions  # on the input's own slice positions
    back = read_rtstruct(series, path)
    assert np.array_equal(back["Bladder"], known_masks["bladder"])
    assert np.array_equal(back["CTVn"], known_masks["ctvn"])


def test_roi_names_display_or_tg263(series, known_masks, tmp_path):
    definitions = {"bladder": definition("Urinary bladder", (255, 215, 0), "ORGAN", "Bladder"),
                   "ctvn": definition("CTV nodes", (0, 200, 255), "CTV")}  # no TG-263 name: the display name
    for style, expected in (("display", {"Urinary bladder", "CTV nodes"}), ("tg263", {"Bladder", "CTV nodes"})):
        path = write_rtstruct(series, known_masks, tmp_path / f"{style}.dcm", {}, definitions, style)
        assert {r.ROIName for r in pydicom.dcmread(path).StructureSetROISequence} == expected
    with pytest.raises(OptionError, match="display, tg263"):
        write_rtstruct(series, known_masks, tmp_path / "x.dcm", {}, definitions, "short")
    seg = read_seg(series, write_seg(series, known_masks, tmp_path / "seg.dcm", {}, {}, definitions))
    assert set(seg) == {"Urinary bladder", "CTV nodes"}  # segment labels are display names


def test_seg_round_trip_voxel_for_voxel(series, known_masks, tmp_path):
    path = write_seg(series, known_masks, tmp_path / "seg.dcm", {"name": "m", "sha256": "ab" * 32},
                     {"bladder": {"id": "bladder-123", "content_hash": "12" * 32},
                      "ctvn": {"id": "ctvn-456", "content_hash": "45" * 32}}, DEFINITIONS)
    seg = hd.seg.segread(str(path))  # highdicom's reader accepts it
    validate_dataset(pydicom.dcmread(path))
    assert seg.StudyInstanceUID == series.study_uid and "autocontour draft" in seg.SeriesDescription
    algorithm = seg.get_segment_description(1).algorithm_identification
    assert algorithm[0].AlgorithmName == "autocontour"
    assert algorithm[0].AlgorithmParameters == f"model_sha256={'ab' * 32},support_set=bladder-123," \
                                               f"support_set_sha256={'12' * 32}"
    back = read_seg(series, path)
    assert np.array_equal(back["Bladder"], known_masks["bladder"])
    assert np.array_equal(back["CTVn"], known_masks["ctvn"])


def test_seg_segments_have_distinct_display_colours(series, known_masks, tmp_path):
    from autocontour.catalogue import PALETTE

    clash = definition("Bowel", DEFINITIONS["bladder"].colour, "ORGAN")  # declares the bladder's colour
    masks = known_masks | {"bowel": np.roll(known_masks["bladder"], 40, axis=1)}
    path = write_seg(series, masks, tmp_path / "seg.dcm", {}, {}, DEFINITIONS | {"bowel": clash})
    segments = {item.SegmentLabel: item for item in pydicom.dcmread(path).SegmentSequence}
    colours = {label: hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
               for label, item in segments.items()}
    assert colours["Bladder"] == DEFINITIONS["bladder"].colour and colours["CTVn"] == DEFINITIONS["ctvn"].colour
    assert colours["Bowel"] == PALETTE[0] and len(set(colours.values())) == 3
    read = hd.seg.segread(str(path))
    assert all("RecommendedDisplayCIELabValue" in read.get_segment_description(n) for n in read.segment_numbers)


def test_segment_a_dicom_folder_and_zip(pelvic_series, tmp_path, small_weights):
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in pelvic_series.glob("CT*"):
            z.write(path, path.name)
    for source, out in ((pelvic_series, tmp_path / "folder"), (archive, tmp_path / "zip")):
        assert main(["segment", str(source), "--out", str(out), "--weights", str(small_weights),
                     "--support-size", "2", "--quiet", "--no-preview"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["input"]["format"] == "DICOM series"
        assert summary["files"]["rtstruct"] == "rtstruct.dcm" and summary["files"]["seg"] == "seg.dcm"
    assert_outputs_round_trip(read_series(archive), tmp_path / "zip")


def test_a_slab_too_short_to_place_draws_nothing_unless_asked(tmp_path, small_weights):
    """The 20-slice upper-abdomen series (38 mm) is too short for the skeleton match and for registration:
    every structure comes back not_localised with the reason, and no RTSTRUCT or SEG of guesses is written;
    --axial-search all searches it anyway."""
    out = tmp_path / "default"
    assert main(["segment", str(SERIES), "--out", str(out), "--weights", str(small_weights),
                 "--support-size", "2", "--quiet", "--no-preview"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name, structure in summary["structures"].items():
        assert structure["status"] == "not_localised" and structure["voxels"] == 0, name
        assert "38 mm long" in structure["status_reason"] and "axial_search=all" in structure["status_reason"]
        assert structure["localisation"]["verdict"] == "too_short" and structure["slices_computed"] == 0
    assert "rtstruct" not in summary["files"] and not (out / "rtstruct.dcm").exists()
    forced = tmp_path / "all"
    assert main(["segment", str(SERIES), "--out", str(forced), "--weights", str(small_weights), "--structures",
                 "bladder", "--support-size", "2", "--quiet", "--no-preview", "--axial-search", "all"]) == 0
    bladder = json.loads((forced / "summary.json").read_text())["structures"]["bladder"]
    assert bladder["slices_computed"] == 20 and bladder["status"] != "not_localised"


def test_cli_refuses_bad_dicom_with_exit_2_and_one_line(bad_dicom, tmp_path, capsys, monkeypatch, small_weights):
    monkeypatch.setenv("AUTOCONTOUR_MAX_DICOM_BYTES", str(BOMB_LIMIT))
    assert_segment_refuses(bad_dicom, tmp_path / "out", small_weights, capsys, ignore_case=True)


@pytest.fixture(scope="module")
def orthanc():
    server = start_orthanc()
    yield server
    server.stop()


def _series_of_study(orthanc, study_uid: str) -> dict[str, str]:
    found = httpx.get(f"{orthanc.dicomweb}/studies/{study_uid}/series").json()
    return {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in found}


def test_pacs_pull_segment_and_push(orthanc, pelvic_series, tmp_path, small_weights):
    study = pacs_copy(pelvic_series, tmp_path / "pacs")
    upload_folder(orthanc, tmp_path / "pacs")
    assert sorted(_series_of_study(orthanc, study).values()) == ["CT"]
    code = main(["pacs", "pull", "--url", orthanc.dicomweb, "--study", study, "--out", str(tmp_path / "out"),
                 "--push", "--weights", str(small_weights), "--support-size", "2"])
    assert code == 0
    modalities = sorted(_series_of_study(orthanc, study).values())
    assert modalities == ["CT", "RTSTRUCT", "SEG"]  # visible in Orthanc, under the same study
    series = read_series(tmp_path / "pacs")  # the same files (and UIDs) as the PACS holds
    assert_outputs_round_trip(series, tmp_path / "out")
    in_pacs = _series_of_study(orthanc, study)
    for name in ("rtstruct.dcm", "seg.dcm"):  # the files pushed are the files checked
        assert str(pydicom.dcmread(tmp_path / "out" / name).SeriesInstanceUID) in in_pacs
    assert main(["pacs", "pull", "--url", orthanc.dicomweb, "--study", "1.2.3.999", "--out", str(tmp_path / "x"),
                 "--weights", str(small_weights)]) == 2
    assert main(["pacs", "pull", "--url", "http://127.0.0.1:9/dicom-web", "--study", study, "--out",
                 str(tmp_path / "y"), "--weights", str(small_weights)]) == 2


@pytest.fixture(scope="module")
def dicom_server(orthanc, tmp_path_factory, small_weights):
    """One server for this module's HTTP tests, with the PACS and a small zip inflation limit."""
    data = tmp_path_factory.mktemp("server")
    server = start_server(data, small_weights, pacs_url=orthanc.dicomweb, max_dicom_bytes=BOMB_LIMIT)
    yield server
    server.stop()


def test_server_refuses_bad_dicom_with_named_4xx_and_stays_healthy(dicom_server, bad_dicom):
    uploads = Path(dicom_server.env["AUTOCONTOUR_DATA_DIR"]) / "uploads"
    before = set(uploads.iterdir()) if uploads.exists() else set()
    jobs = len(httpx.get(f"{dicom_server.url}/v1/segmentations").json())
    for name, (path, words) in bad_dicom.items():
        if path.is_dir():
            continue  # HTTP takes zips only
        with open(path, "rb") as f:
            response = httpx.post(f"{dicom_server.url}/v1/segmentations", files={"file": ("ct.zip", f)},
                                  data={"structures": "bladder"}, timeout=120)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert response.headers["content-type"] == PROBLEM, (name, response.text)
        body = response.json()
        assert body["status"] == response.status_code and body["type"] == "urn:autocontour:problem:invalid-image"
        assert words.lower() in body["detail"].lower(), (name, body)
    assert httpx.get(f"{dicom_server.url}/healthz").status_code == 200
    assert httpx.get(f"{dicom_server.url}/readyz").status_code == 200
    assert len(httpx.get(f"{dicom_server.url}/v1/segmentations").json()) == jobs  # no job was queued
    assert (set(uploads.iterdir()) if uploads.exists() else set()) == before  # no refused upload left on disk


def test_server_upload_picks_a_series(dicom_server, bad_dicom):
    """series_uid picks one CT series of a zip that holds two; a UID not in it is a named 422; axial_search is
    an option of the job."""
    mixed, _ = bad_dicom["two CT series"]
    for series_uid, status in (("9.9", 422), ("1.2.826.0.1.3680043.8.498.1", 202)):
        with open(mixed, "rb") as f:
            response = httpx.post(f"{dicom_server.url}/v1/segmentations", files={"file": ("ct.zip", f)},
                                  data={"structures": "bladder", "series_uid": series_uid, "roi_names": "tg263",
                                        "axial_search": "all"}, timeout=120)
        assert response.status_code == status, response.text
    assert "CT series 9.9 is not in the input; CT series found:" in httpx.post(
        f"{dicom_server.url}/v1/segmentations", files={"file": ("ct.zip", mixed.read_bytes())},
        data={"series_uid": "9.9"}).json()["detail"]
    job = response.json()
    assert job["options"]["series_uid"] == "1.2.826.0.1.3680043.8.498.1" and job["options"]["roi_names"] == "tg263"
    assert job["options"]["axial_search"] == "all"  # a slab too short to place is searched when asked
    refused = httpx.post(f"{dicom_server.url}/v1/segmentations", files={"file": ("ct.zip", mixed.read_bytes())},
                         data={"series_uid": "1.2.826.0.1.3680043.8.498.1", "axial_search": "sometimes"})
    assert refused.status_code == 422 and "axial_search" in refused.text
    httpx.delete(f"{dicom_server.url}/v1/segmentations/{job['id']}")  # accepted is all this test needs


def test_server_zip_upload_and_pacs_job(orthanc, dicom_server, pelvic_series, tmp_path):
    study = pacs_copy(pelvic_series, tmp_path / "pacs")
    server = dicom_server
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in (tmp_path / "pacs").iterdir():
            z.write(path, path.name)
    with open(archive, "rb") as f:
        response = httpx.post(f"{server.url}/v1/segmentations", files={"file": ("ct.zip", f)},
                              params={"wait": "true"}, timeout=300)
    assert response.status_code == 200
    with zipfile.ZipFile(__import__("io").BytesIO(response.content)) as z:
        assert {"rtstruct.dcm", "seg.dcm"} <= set(z.namelist())
    job_id = response.headers["x-job-id"]
    assert httpx.get(f"{server.url}/v1/segmentations/{job_id}/dicom/rtstruct").status_code == 200

    upload_folder(orthanc, tmp_path / "pacs")
    submitted = httpx.post(f"{server.url}/v1/segmentations", data={"study_uid": study, "push_to_pacs": "true",
                                                                   "structures": "bladder,ctvn"})
    assert submitted.status_code == 202
    job_url = f"{server.url}/v1/segmentations/{submitted.json()['id']}"
    for _ in range(600):
        job = httpx.get(job_url).json()
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert job["status"] == "done", job
    assert job["result"]["pushed_to_pacs"] == ["rtstruct.dcm", "seg.dcm"]
    assert sorted(set(_series_of_study(orthanc, study).values())) == ["CT", "RTSTRUCT", "SEG"]
    missing = httpx.post(f"{server.url}/v1/segmentations", data={"study_uid": "1.2.3.999"}).json()
    job = httpx.get(f"{server.url}/v1/segmentations/{missing['id']}").json()
    for _ in range(100):
        if job["status"] == "failed":
            break
        time.sleep(0.2)
        job = httpx.get(f"{server.url}/v1/segmentations/{missing['id']}").json()
    assert job["status"] == "failed" and "not in the PACS" in job["error"]["detail"]
