"""Start real autocontour servers (uvicorn on loopback, separate processes) for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    env: dict

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def service_env(data_dir: Path, weights: Path, support_dirs: list[Path] | None = None, **settings) -> dict:
    """Environment for an autocontour process: AUTOCONTOUR_* settings only from the arguments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCONTOUR_")}
    env |= {"AUTOCONTOUR_DATA_DIR": str(data_dir), "AUTOCONTOUR_WEIGHTS": str(weights),
            "AUTOCONTOUR_DEVICE": "cpu", "AUTOCONTOUR_CPU_SUPPORT_SIZE": "2"}
    if support_dirs is not None:
        env |= {"AUTOCONTOUR_SUPPORT_DIRS": json.dumps([str(d) for d in support_dirs]),
                "AUTOCONTOUR_SHIPPED_SUPPORT": "false"}
    env |= {f"AUTOCONTOUR_{k.upper()}": v if isinstance(v, str) else json.dumps(v) for k, v in settings.items()}
    return env


def start_server(data_dir: Path, weights: Path, support_dirs: list[Path] | None = None, timeout: float = 120,
                 ready_path: str = "/readyz", environment: dict | None = None, **settings) -> Server:
    """`autocontour serve` in a child process; waits until `ready_path` answers 200.

    `environment`: other variables for the process (TMPDIR, say)."""
    port = free_port()
    env = service_env(data_dir, weights, support_dirs, **settings) | (environment or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"server-{port}.log"
    process = subprocess.Popen([sys.executable, "-m", "autocontour.cli", "serve", "--port", str(port)], env=env,
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.url}{ready_path}", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready in {timeout} s:\n{server.logs()}")


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


def start_worker(env: dict, name: str, data_dir: Path, timeout: float = 120) -> Worker:
    """`autocontour worker` in a child process; waits until Celery reports it ready."""
    log = data_dir / f"worker-{name}.log"
    process = subprocess.Popen([sys.executable, "-m", "autocontour.cli", "worker", "--name", name], env=env,
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        if " ready." in log.read_text(errors="replace"):
            return Worker(name, process, log)
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"worker not ready:\n{log.read_text(errors='replace')}")
