"""/v1/evaluations: metrics for an uploaded prediction against an uploaded reference."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from autocontour.evaluation.evaluate import evaluate_pairs, pair_inputs, parse_tolerances
from autocontour.evaluation.metrics import metric_keys
from autocontour.io import inspect_nifti
from autocontour.server.auth import AuthenticatedFirst, require
from autocontour.server.decoding import decode_limited
from autocontour.server.dependencies import DecodesDep, SettingsDep
from autocontour.server.openapi import AUTH, problem_responses

router = APIRouter(route_class=AuthenticatedFirst, prefix="/v1", tags=["evaluations"],
                   responses=problem_responses(*AUTH))


async def _save(upload: UploadFile, folder: Path, stem: str) -> Path:
    head = await upload.read(2)
    await upload.seek(0)
    path = folder / (f"{stem}.nii.gz" if head == b"\x1f\x8b" else f"{stem}.nii")
    with open(path, "wb") as out:
        while chunk := await upload.read(1 << 20):
            out.write(chunk)
    return path


def _evaluate(pred: Path, ref: Path, structure: str | None, tolerances, settings) -> list[dict]:
    for path in (pred, ref):  # masks compress far better than CTs: their cost is bounded by the decoded size
        inspect_nifti(path, settings.max_voxels, settings.max_decoded_bytes)
    return evaluate_pairs(pair_inputs(pred, ref, [structure] if structure else None), tolerances)


@router.post("/evaluations", responses=problem_responses(400, 413, 422, 503, described={
    422: "an unreadable or mismatched mask, an invalid tolerance, or a missing file",
    503: "every decode slot (AUTOCONTOUR_MAX_CONCURRENT_DECODES) stayed busy; retry after Retry-After"}))
async def evaluate(
    settings: SettingsDep,
    decodes: DecodesDep,
    prediction: Annotated[UploadFile, File(description="predicted mask or label map (NIfTI)")],
    reference: Annotated[UploadFile, File(description="reference mask or label map on a comparable grid")],
    structure: Annotated[str | None, Form(description="name for a single binary pair")] = None,
    tolerance_mm: Annotated[str, Form(description="surface-Dice tolerances in mm, comma-separated")] = "1,2,3",
    _: str | None = require("evaluate"),
):
    """The metrics of `autocontour evaluate` (same code): one record per structure or label value."""
    tolerances = parse_tolerances(tolerance_mm)
    with tempfile.TemporaryDirectory(dir=settings.scratch_dir) as tmp:  # under the data folder, swept
        pred = await _save(prediction, Path(tmp), "prediction")
        ref = await _save(reference, Path(tmp), "reference")
        records = await run_in_threadpool(decode_limited, decodes, settings, _evaluate, pred, ref, structure,
                                          tolerances, settings)
    return {"tolerances_mm": list(tolerances), "metric_keys": metric_keys(tolerances), "records": records}
