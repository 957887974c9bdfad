"""The bad-input corpus of the second outside probe (issue 34): at least 60 kinds of input, each through the
real server and the CLI.

NIfTI files, DICOM series (folders and zips), RTSTRUCTs and support sets: every kind ends in a 4xx problem
document (server) or exit 2 and one line (CLI) naming what is wrong, or in a finished segmentation; never a
traceback, and the server answers /healthz after each. The corpus gathers the shared ones (tests/badinputs.py,
test_dicom.py, test_dicom_series_hardening.py) and adds what the probe found. Support sets are built by the
CLI only (the server has no route that builds one), so their kinds run through the CLI.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from badinputs import accepted_inputs, bad_inputs
from servers import start_server
from test_dicom import BOMB_LIMIT, SERIES, bad_dicom_inputs
from test_dicom_series_hardening import REFUSED, _duplicate_uids, _rescaled, _same_meta_uid, _series
from test_server import PROBLEM, wait_done

from autocontour.catalogue import BUILTIN
from autocontour.cli import main
from autocontour.dicom.outputs import write_rtstruct
from autocontour.dicom.series import read_series
from autocontour.support.store import MANIFEST

MIN_KINDS = 60
SEGMENT = ["--structures", "bladder", "--support-size", "2", "--quiet", "--no-preview"]


@dataclass(frozen=True)
class Case:
    """One kind of CT input and what must come of it."""

    path: Path  # a NIfTI file, a zip, or a DICOM folder (zipped for the server)
    words: str  # what its refusal must say; "" for an input that must be segmented
    http_words: str | None = None  # where an upload (which has no file name) is refused in other words

    def expected(self, http: bool) -> str:
        return self.http_words if http and self.http_words is not None else self.words


def _blob_rtstruct(folder: Path) -> Path:
    """An RTSTRUCT of one ROI ('Bladder', a blob) on the 20-slice series."""
    series = read_series(SERIES)
    z, y, x = np.ogrid[:20, :512, :512]
    blob = ((y - 250) / 70.0) ** 2 + ((x - 300) / 55.0) ** 2 + ((z - 9) / 7.0) ** 2 <= 1
    return write_rtstruct(series, {"bladder": blob}, folder / "rtstruct.dcm", {}, BUILTIN,
                          approved_by="Reviewer^Test")


def _three_slices(folder: Path) -> Path:
    """Three slices of the 20-slice series: too short to place, so a finished job that finds nothing."""
    folder.mkdir(parents=True)
    slices = sorted(SERIES.glob("CT.*"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for path in slices[8:11]:
        shutil.copy(path, folder / path.name)
    return folder


def segment_corpus(folder: Path) -> dict[str, Case]:
    """name -> Case, for `segment` (CLI) and POST /v1/segmentations (server)."""
    cases = {f"NIfTI: {name}": Case(path, words) for name, (path, words) in bad_inputs(folder / "nifti").items()}
    cases["NIfTI: wrong extension"] = Case(cases["NIfTI: wrong extension"].path, ".nii", "not a NIfTI file")
    cases |= {f"NIfTI: {name}": Case(path, "") for name, path in accepted_inputs(folder / "accepted")[1].items()}
    rtstruct = _blob_rtstruct(folder)
    cases |= {f"DICOM: {name}": Case(path, words)
              for name, (path, words) in bad_dicom_inputs(folder / "dicom", rtstruct).items()}
    cases |= {f"series: {name}": Case(_series(folder / "series" / name.replace(" ", "_"), edit, only), words,
                                      _numbered_as_extracted(words))
              for name, (edit, only, words) in REFUSED.items()}
    empty = folder / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    cases["DICOM: empty zip"] = Case(empty, "the zip is empty")
    cases["series: 3 slices"] = Case(_three_slices(folder / "three"), "")
    cases["series: a rescale per slice"] = Case(_series(folder / "rescales", _rescaled(1, -3072, False),
                                                        lambda i: i % 2 == 0), "")
    cases["series: one SOP Instance UID in the file meta"] = Case(_series(folder / "meta_uid", _same_meta_uid), "")
    cases["series: duplicate SOP Instance UIDs"] = Case(_series(folder / "duplicates", _duplicate_uids), "")
    return cases


def _numbered_as_extracted(words: str) -> str:
    """The words naming slice 007.dcm of a folder, as the server names it: the folder is uploaded as a zip,
    whose members are extracted under their 5-digit place in it, never their own names."""
    return re.sub(r"\b(\d{3})\.dcm", r"00\1.dcm", words)


def _edited_rtstruct(rtstruct: Path, out: Path, edit) -> Path:
    ds = pydicom.dcmread(rtstruct)
    edit(ds)
    ds.save_as(out)
    return out


def support_corpus(folder: Path, phantom: tuple[Path, Path], rtstruct: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (`autocontour` arguments, the words its exit-2 line must hold): support sets built from bad
    cases, and a tampered set segmented with."""
    ct, labels = phantom
    folder.mkdir(parents=True, exist_ok=True)
    blank = _edited_rtstruct(rtstruct, folder / "blank.dcm",
                             lambda ds: setattr(ds.StructureSetROISequence[0], "ROIName", ""))
    slice_file = next(SERIES.glob("CT.*"))
    not_dicom = folder / "notes.dcm"
    not_dicom.write_text("not a DICOM file")
    corrupt_ct = bad_inputs(folder / "nifti")["magic b'xxxx'"][0]
    other_grid = folder / "other_grid.nii.gz"
    sitk.WriteImage(sitk.Shrink(sitk.ReadImage(str(labels)), [2, 2, 1]), str(other_grid))
    empty_mask = folder / "empty_mask.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(labels)) * 0, str(empty_mask))

    def build(name: str, mask: Path, *extra: str, case_ct: Path = ct, structure: str = "bladder") -> list[str]:
        return ["support", "build", structure, "--case", str(case_ct), str(mask), *extra, "--size", "8",
                "--no-atlas", "--out", str(folder / "sets" / name)]

    tampered = folder / "tampered"
    tampered.mkdir()
    assert main(build("tampered", labels, "--label", "104")) == 0
    shutil.move(folder / "sets" / "tampered", tampered / "bladder")
    manifest = json.loads((tampered / "bladder" / MANIFEST).read_text())
    manifest["slices"][0]["level"] = 0.5
    (tampered / "bladder" / MANIFEST).write_text(json.dumps(manifest))
    return {
        "RTSTRUCT ROI with a blank name": (build("blank", blank, "--roi", "Bladder", case_ct=SERIES),
                                           "it has: ROI 1 (its name is blank)"),
        "RTSTRUCT without the ROI asked for": (build("rectum", rtstruct, "--roi", "Rectum", case_ct=SERIES),
                                               "no ROI named 'Rectum' in the RTSTRUCT; it has: Bladder"),
        "RTSTRUCT that is not DICOM": (build("text", not_dicom, "--roi", "Bladder", case_ct=SERIES),
                                       "not a readable DICOM file"),
        "a CT slice as the RTSTRUCT": (build("slice", slice_file, "--roi", "Bladder", case_ct=SERIES),
                                       "modality 'CT', expected RTSTRUCT"),
        "support CT with a corrupted magic": (build("magic", labels, "--label", "104", case_ct=corrupt_ct),
                                              "magic string is b'xxxx'"),
        "mask on another grid": (build("grid", other_grid, "--label", "104"), "grid"),
        "empty mask": (build("empty", empty_mask, "--label", "104"), "empty"),
        "label absent from the label map": (build("label", labels, "--label", "250"), "250"),
        "invalid structure name": (build("name", labels, "--label", "104", structure="Bladder!"),
                                   "invalid structure name"),
        "tampered support set": (["segment", str(ct), "--out", str(folder / "out"), "--support-dir", str(tampered),
                                  "--no-shipped-support", *SEGMENT], "content hash"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Case]:
    return segment_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def support_cases(tmp_path_factory, phantom_cases) -> dict[str, tuple[list[str], str]]:
    folder = tmp_path_factory.mktemp("support_corpus")
    return support_corpus(folder, phantom_cases[0], _blob_rtstruct(folder))


def test_the_corpus_holds_at_least_60_kinds(corpus, support_cases):
    kinds = len(corpus) + len(support_cases)
    accepted = [name for name, case in corpus.items() if not case.words]
    print(f"{kinds} kinds: {len(corpus)} CT inputs ({len(accepted)} to segment), {len(support_cases)} support sets")
    assert kinds >= MIN_KINDS and len(accepted) >= 5


def _upload_bytes(path: Path) -> bytes:
    """What a client uploads: the file, or a DICOM folder as a zip."""
    if path.is_file():
        return path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member in sorted(path.iterdir()):
            archive.write(member, member.name)
    return buffer.getvalue()


def test_every_kind_through_the_server(corpus, tmp_path, small_weights):
    server = start_server(tmp_path / "data", small_weights, max_dicom_bytes=BOMB_LIMIT)
    started, jobs = time.monotonic(), {}
    try:
        for name, case in corpus.items():
            response = httpx.post(f"{server.url}/v1/segmentations", data={"structures": "bladder"}, timeout=300,
                                  files={"file": ("upload", _upload_bytes(case.path))})
            if case.words:
                assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
                assert response.headers["content-type"] == PROBLEM, (name, response.text)
                assert case.expected(http=True) in response.json()["detail"], (name, response.json())
            else:
                assert response.status_code == 202, (name, response.text)
                jobs[name] = response.json()["id"]
            assert httpx.get(f"{server.url}/healthz").status_code == 200, name
        for name, job_id in jobs.items():
            job = wait_done(server.url, job_id, timeout=600)
            assert job["status"] == "done", (name, job)
        statuses = json.dumps(wait_done(server.url, jobs["series: 3 slices"])["result"])
        assert "not_localised" in statuses, statuses
        assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text
        assert "Traceback" not in server.logs()
    finally:
        server.stop()
    print(f"server: {len(corpus)} kinds ({len(jobs)} segmented) in {time.monotonic() - started:.0f} s")


def cli_subset(corpus: dict[str, Case]) -> list[str]:
    """The CT kinds the CLI test runs: every third refusal (each also runs through `segment` in test_pipeline,
    test_dicom or test_dicom_series_hardening) and the inputs that must be segmented from NIfTI-2 and a
    3-slice series (the rest take 5 to 30 s each)."""
    refused = [name for name, case in corpus.items() if case.words]
    return refused[::3] + ["NIfTI: NIfTI-2 .nii.gz", "series: 3 slices"]


def test_kinds_through_the_cli(corpus, support_cases, tmp_path, capsys, monkeypatch, small_weights):
    """A representative subset of the CT kinds (`cli_subset`) and every support-set kind."""
    monkeypatch.setenv("AUTOCONTOUR_MAX_DICOM_BYTES", str(BOMB_LIMIT))
    started = time.monotonic()
    runs = {name: (["segment", str(corpus[name].path), "--out", str(tmp_path / "out" / str(i)), "--weights",
                    str(small_weights), *SEGMENT], corpus[name].expected(http=False))
            for i, name in enumerate(cli_subset(corpus))}
    runs |= {name: (argv + (["--weights", str(small_weights)] if argv[0] == "segment" else []), words)
             for name, (argv, words) in support_cases.items()}
    for name, (argv, words) in runs.items():
        code = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, err)
        if words:
            assert code == 2 and err.count("\n") == 1 and err.startswith("autocontour: error: "), (name, code, err)
            assert words in err, (name, err)
        else:
            assert code == 0, (name, err)
    assert len(runs) >= 20
    print(f"CLI: {len(runs)} kinds in {time.monotonic() - started:.0f} s")
