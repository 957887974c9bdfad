"""Every OpenKBP planning CT through `autocontour segment`: exit codes and tracebacks, counted.

The OpenKBP head-and-neck CTs (../shared/data/openkbp_hn) sit on a coarse in-plane grid (3.9-4.7 mm) and pad
the scanned body with air: the kind of valid planning CT that once ended in an ITK traceback. Each patient
runs as a user runs it, one `autocontour segment` process with the registration prior on, and the script
prints one line per failure and the count:

    python bench/openkbp_smoke.py [--split train,validation] [--structures bladder] [--limit N]

It reads nothing but the CTs (no contour) and writes into a temporary folder it removes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "openkbp_hn"


def segment(ct: Path, out: Path, structures: str) -> tuple[int, str]:
    """Exit code and stderr of one `autocontour segment` run."""
    run = subprocess.run([sys.executable, "-m", "autocontour.cli", "segment", str(ct), "--out", str(out),
                          "--structures", structures, "--quiet", "--no-preview"],
                         capture_output=True, text=True, timeout=1800)
    return run.returncode, run.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="train,validation")
    parser.add_argument("--structures", default="bladder")
    parser.add_argument("--limit", type=int, default=None, help="at most this many patients per split")
    args = parser.parse_args()
    patients = [p for split in args.split.split(",") for p in sorted((DATA / split).iterdir())[:args.limit]
                if (p / "ct.nii.gz").is_file()]
    failures, started = 0, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="openkbp-smoke-") as tmp:
        for number, patient in enumerate(patients, 1):
            code, stderr = segment(patient / "ct.nii.gz", Path(tmp) / patient.name, args.structures)
            failed = code != 0 or "Traceback" in stderr
            failures += failed
            last = stderr.strip().splitlines()[-1] if failed and stderr.strip() else "ok"
            print(f"{number}/{len(patients)} {patient.parent.name}/{patient.name}: exit {code}: {last}", flush=True)
    seconds = time.perf_counter() - started
    print(f"{len(patients) - failures} of {len(patients)} patients segmented with exit 0 and no traceback "
          f"({seconds / max(1, len(patients)):.1f} s a patient)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
