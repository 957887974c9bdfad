"""`autocontour pacs pull` and `pacs push`: DICOMweb in and out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontour.cli import parsing


def add_pacs_commands(commands: argparse._SubParsersAction) -> None:
    pacs = parsing.command_group(commands, "pacs", "pull a CT from a DICOMweb PACS and push results back")
    pull = parsing.add_command(pacs, "pull", cmd_pacs_pull,
                               help="fetch a study's CT series (QIDO/WADO-RS), segment it, optionally push back")
    pull.add_argument("--url", required=True, help="DICOMweb root, e.g. http://orthanc:8042/dicom-web")
    pull.add_argument("--study", required=True, help="Study Instance UID")
    pull.add_argument("--series", default=None, help="Series Instance UID (needed when the study has several CTs)")
    pull.add_argument("--out", type=Path, required=True)
    pull.add_argument("--push", action="store_true", help="store the RTSTRUCT and SEG back into the PACS")
    pull.add_argument("--structures", default=None, help=parsing.structures_help())
    parsing.inference_options(pull)
    parsing.roi_names_option(pull)
    pull.add_argument("--username", default=None)
    pull.add_argument("--password", default=None, help="default: $AUTOCONTOUR_PACS_PASSWORD")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    push = parsing.add_command(pacs, "push", cmd_pacs_push,
                               help="store DICOM files (an RTSTRUCT, a SEG) into a DICOMweb PACS")
    push.add_argument("--url", required=True)
    push.add_argument("files", type=Path, nargs="+")
    push.add_argument("--username", default=None)
    push.add_argument("--password", default=None)
    find = parsing.add_command(pacs, "find", cmd_pacs_find,
                               help="find studies by patient ID, accession number or date (QIDO-RS)")
    find.add_argument("--url", required=True, help="DICOMweb root, e.g. http://orthanc:8042/dicom-web")
    find.add_argument("--patient-id", default=None)
    find.add_argument("--accession", default=None, help="accession number")
    find.add_argument("--date", default=None, help="study date YYYYMMDD, or a range YYYYMMDD-YYYYMMDD")
    find.add_argument("--username", default=None)
    find.add_argument("--password", default=None, help="default: $AUTOCONTOUR_PACS_PASSWORD")


def cmd_pacs_pull(args: argparse.Namespace) -> int:
    """Fetch the CT series of a study from a DICOMweb server, segment it, write NIfTI masks, rtstruct.dcm and
    seg.dcm to --out, and with --push store the RTSTRUCT and SEG back into the study (STOW-RS). Results are
    drafts."""
    import tempfile

    from autocontour.dicom import pacs

    options = parsing.segment_options(args)
    client = pacs.connect(args.url, args.username, parsing.pacs_password(args))
    series_uid = pacs.find_ct_series(client, args.study, args.series)
    segmenter = parsing.segmenter_from(args)
    with tempfile.TemporaryDirectory(prefix="autocontour-pacs-") as tmp:
        files = pacs.fetch_series(client, args.study, series_uid, Path(tmp))
        print(f"fetched {len(files)} slices of series {series_uid}", file=sys.stderr)
        update, close = parsing.progress_bar(args.quiet)
        try:
            result = segmenter.segment(Path(tmp), args.out, options, progress=update)
        finally:
            close()
    parsing.print_report(result.summary, args.out)
    outputs = [result.files[k] for k in ("rtstruct", "seg") if k in result.files]
    if args.push and outputs:
        pacs.store(client, outputs)
        print(f"stored {', '.join(p.name for p in outputs)} in study {args.study}")
    elif args.push:
        print("nothing pushed: no structure has any voxel, so no RTSTRUCT or SEG was written", file=sys.stderr)
    return 0


def cmd_pacs_push(args: argparse.Namespace) -> int:

    from autocontour.dicom import pacs
    from autocontour.errors import InputImageError

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise InputImageError(f"file not found: {', '.join(missing)}")
    client = pacs.connect(args.url, args.username, parsing.pacs_password(args))
    pacs.store(client, list(args.files))
    print(f"stored {len(args.files)} file(s)")
    return 0


def cmd_pacs_find(args: argparse.Namespace) -> int:
    """List the studies that match every criterion given, with their Study Instance UIDs for `pacs pull --study`
    and `support build --study`."""
    from autocontour.dicom import pacs

    client = pacs.connect(args.url, args.username, parsing.pacs_password(args))
    studies = pacs.find_studies(client, args.patient_id, args.accession, args.date)
    for study in studies:
        print(f"{study['study_uid']}  {study['date'] or '-':<8}  {study['modalities'] or '-':<12}  "
              f"{study['description']}")
    print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} found", file=sys.stderr)
    return 0
