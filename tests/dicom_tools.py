"""Third-party checks of our DICOM outputs, and a real CT written as the DICOM series a new user would have.

dciodvfy (Debian dicom3tools) checks a file against its IOD; plastimatch rasterises an RTSTRUCT the way
planning systems do. Both are installed by `.ci/run`; a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from autocontour.catalogue import BUILTIN, StructureDefinition

PATIENT_NAME = "Yamada^Tarō"  # not Latin-1: survives only if the character set (UTF-8) is copied
INPUT_ATTRIBUTES = {"PatientName": PATIENT_NAME, "PatientID": "AC-0042", "PatientBirthDate": "19700101",
                    "PatientSex": "M", "AccessionNumber": "ACC-2024-17", "ReferringPhysicianName": "Sato^Hanako",
                    "InstitutionName": "Example Cancer Centre", "StudyID": "S17", "StudyDate": "20240311",
                    "StudyTime": "101500"}


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (.ci/run installs it from Debian)"
    return path


def write_ct_series(nifti: Path, folder: Path) -> Path:
    """A NIfTI CT written as one CT Image Storage file per axial slice (LPS, int16 HU, UTF-8 character set)."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(nifti)), "LPS")
    hu = sitk.GetArrayFromImage(image).astype(np.int16)
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    spacing = image.GetSpacing()
    for index in range(hu.shape[0]):
        ds = pydicom.Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        for keyword, value in INPUT_ATTRIBUTES.items():
            setattr(ds, keyword, value)
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 2, index + 1
        ds.SeriesDate, ds.SeriesTime = ds.StudyDate, ds.StudyTime
        ds.ContentDate = date.today().strftime("%Y%m%d")
        ds.PositionReferenceIndicator, ds.Manufacturer, ds.ImageType = "", "test", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [round(v, 4) for v in image.TransformIndexToPhysicalPoint((0, 0, index))]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType, ds.KVP = 0, 1, "HU", 120
        ds.PixelData = hu[index].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, \
            ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(str(folder / f"CT{index:04d}.dcm"), enforce_file_format=True)
    return folder


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for a file (warnings are not errors)."""
    run = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def plastimatch_masks(rtstruct: Path, ct_folder: Path, out: Path, xor: bool = False) -> dict[str, np.ndarray]:
    """plastimatch's rasterisation of every ROI onto the CT: ROI name -> (slice, row, column) bool."""
    command = [tool("plastimatch"), "convert", "--input", str(rtstruct), "--referenced-ct", str(ct_folder),
               "--output-prefix", str(out), "--prefix-format", "nrrd"] + (["--xor-contours"] if xor else [])
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return {p.stem: sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool) for p in sorted(out.glob("*.nrrd"))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def definition(display_name: str, colour: tuple[int, int, int], interpreted_type: str,
               tg263_name: str | None = None) -> StructureDefinition:
    """A structure definition as support sets declare it (and the DICOM writers take it)."""
    name = display_name.lower().replace(" ", "_")
    return StructureDefinition(name=name, display_name=display_name, colour=colour,
                               interpreted_type=interpreted_type, tg263_name=tg263_name)


DEFINITIONS = {n: BUILTIN[n] for n in ("bladder", "anorectum", "ctvn")}


def assert_segment_refuses(cases: dict[str, tuple[Path, str]], out: Path, weights: Path, capsys,
                           ignore_case: bool = False) -> None:
    """`autocontour segment` refuses each input with exit 2 and one line naming the words, writing no RTSTRUCT."""
    from autocontour.cli import main

    for name, (path, words) in cases.items():
        code = main(["segment", str(path), "--out", str(out), "--weights", str(weights), "--support-size", "2",
                     "--quiet", "--no-preview"])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("autocontour: error: "), (name, err)
        assert (words.lower() in err.lower()) if ignore_case else (words in err), (name, err)
    assert not (out / "rtstruct.dcm").exists()
