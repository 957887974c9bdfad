"""Planning CTs on a coarse in-plane grid (4-5 mm, as published by some challenges) segment without error."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk
from conftest import write_phantom

from autocontour.cli import main
from autocontour.support.registration import ATLAS_SPACING_MM, make_atlas_ct


def test_an_atlas_copy_of_a_grid_coarser_in_plane_than_the_atlas_is_smoothed_only_along_z():
    ct = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 50, (40, 32, 32)).astype(np.float32))
    ct.SetSpacing((ATLAS_SPACING_MM + 1, ATLAS_SPACING_MM + 1, 1.0))  # x, y coarser than the atlas; z finer
    small = make_atlas_ct(ct)
    assert small.GetSpacing() == (ATLAS_SPACING_MM,) * 3
    assert np.isfinite(sitk.GetArrayViewFromImage(small)).all()


def test_a_coarse_grid_ct_segments_through_the_cli_with_registration_on(tmp_path, small_weights,
                                                                        phantom_support_dir, capsys):
    phantom, _ = write_phantom(tmp_path / "coarse", seed=23, size=(60, 50, 48), spacing=(5.0, 5.0, 2.5))
    body = sitk.ReadImage(str(phantom))
    values = sitk.GetArrayFromImage(body)
    air = np.full((80, *values.shape[1:]), -1024, values.dtype)  # published volumes pad the scan with air
    ct = sitk.GetImageFromArray(np.concatenate([values, air]))
    ct.SetSpacing(body.GetSpacing())
    ct.SetOrigin(body.GetOrigin())
    ct.SetDirection(body.GetDirection())
    ct_path = tmp_path / "coarse_padded.nii.gz"
    sitk.WriteImage(ct, str(ct_path))
    out = tmp_path / "out"
    code = main(["segment", str(ct_path), "--out", str(out), "--weights", str(small_weights),
                 "--support-dir", str(phantom_support_dir), "--no-shipped-support", "--structures", "bladder",
                 "--support-size", "4", "--device", "cpu", "--quiet", "--no-preview"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structures"]["bladder"]["registration_prior"] is not None  # registration ran, did not fail
    assert "Traceback" not in capsys.readouterr().err
