"""A real redis-server (Debian package) on loopback with persistence, for tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from servers import free_port


@dataclass
class RedisServer:
    port: int
    folder: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        # append-only file, fsync on every write: a restart keeps every accepted task
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """kill -9: no shutdown, no final write (the append-only file has every write already)."""
        if self.process:
            self.process.kill()
            self.process.wait(timeout=20)

    def shutdown(self) -> None:
        """A clean `redis-cli shutdown`, as an operator would."""
        binary = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run([binary, "-p", str(self.port), "shutdown"], check=False, capture_output=True, timeout=20)
        if self.process:
            self.process.wait(timeout=20)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


def start_redis(folder: Path) -> RedisServer:
    folder.mkdir(parents=True, exist_ok=True)
    return RedisServer(free_port(), folder).start()
