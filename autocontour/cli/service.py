"""`autocontour serve`, `worker`, `submit`, `health` and `keys`: the HTTP service and its clients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autocontour.cli.parsing import add_command, command_group


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    serve = add_command(commands, "serve", cmd_serve, help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the FastAPI server (uvicorn). Settings: AUTOCONTOUR_* variables and the TOML file named by
    AUTOCONTOUR_CONFIG (see README)."""
    import uvicorn

    from autocontour.server.main import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, access_log=False, log_config=None)
    return 0


def add_worker_command(commands: argparse._SubParsersAction) -> None:
    worker = add_command(commands, "worker", cmd_worker,
                         help="run a Celery worker that owns one model (AUTOCONTOUR_QUEUE=celery)")
    worker.add_argument("--name", default=None, help="worker node name (default: autocontour-PID@HOST)")


def cmd_worker(args: argparse.Namespace) -> int:
    """Load the model once and run segmentation and edit tasks from the Redis broker (AUTOCONTOUR_BROKER_URL). Start one
    per GPU; the API runs with AUTOCONTOUR_QUEUE=celery and the same AUTOCONTOUR_DATA_DIR (shared)."""
    import os
    import socket

    from autocontour.pipeline import Segmenter
    from autocontour.server.celery_queue import EDIT_QUEUE, QUEUE, worker_app
    from autocontour.server.context import configure_logging
    from autocontour.server.settings import ServerSettings

    configure_logging()
    settings = ServerSettings()
    segmenter = Segmenter(settings)
    if settings.warmup:
        segmenter.warm_up()
    app = worker_app(settings, segmenter)
    name = args.name or f"autocontour-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO", f"--hostname={name}",
                     f"--queues={QUEUE},{EDIT_QUEUE}", "--without-gossip", "--without-mingle"])
    return 0


def add_submit_command(commands: argparse._SubParsersAction) -> None:
    submit = add_command(commands, "submit", cmd_submit, help="send a CT to a server and download the draft contours")
    submit.add_argument("ct", type=Path)
    submit.add_argument("--server", required=True, help="base URL, e.g. http://autocontour:8000")
    submit.add_argument("--out", type=Path, required=True)
    submit.add_argument("--structures", default=None)
    submit.add_argument("--support-size", type=int, default=None)
    submit.add_argument("--ensemble", type=int, default=None)
    submit.add_argument("--threshold", type=float, default=None)
    submit.add_argument("--probabilities", action="store_true")
    submit.add_argument("--api-key", default=None, help="default: $AUTOCONTOUR_API_KEY")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result")
    submit.add_argument("--quiet", action="store_true")


def cmd_submit(args: argparse.Namespace) -> int:
    """Upload a CT to an autocontour server, follow its progress, and unpack the result (masks, summary.json,
    preview.png) into --out. Retries on connection errors and a full queue."""
    import os

    import httpx

    from autocontour.client import Client, ServerError
    from autocontour.errors import InputImageError, OptionError

    if not args.ct.is_file():
        raise InputImageError(f"file not found: {args.ct}")
    key = args.api_key or os.environ.get("AUTOCONTOUR_API_KEY")
    last = [""]

    def show(job: dict) -> None:
        p = job.get("progress") or {}
        line = f"{job['status']}" + (f" {p['phase']} {p['slices_done']}/{p['slices_total']} slices"
                                     if p.get("slices_total") else "")
        if line != last[0] and not args.quiet:
            print(line, file=sys.stderr)
            last[0] = line

    try:
        with Client(args.server, key) as client:
            job = client.submit(args.ct, args.structures, args.support_size, args.ensemble, args.threshold,
                                args.probabilities)
            job = client.wait(job["id"], timeout_s=args.timeout, progress=show)
            if job["status"] != "done":
                detail = (job.get("error") or {}).get("detail", job["status"])
                raise OptionError(f"job {job['id']} {job['status']}: {detail}")
            files = client.download(job["id"], args.out)
    except ServerError as exc:
        raise OptionError(f"server refused: {exc}") from exc
    except httpx.HTTPError as exc:
        raise OptionError(f"cannot reach {args.server}: {exc}") from exc
    print(f"DRAFT contours for clinical review: {len(files)} files in {args.out} (job {job['id']})")
    return 0


def add_keys_commands(commands: argparse._SubParsersAction) -> None:
    keys = command_group(commands, "keys", "API-key helpers")
    key_hash = add_command(keys, "hash", cmd_keys_hash, help="print the SHA-256 to configure for an API key")
    key_hash.add_argument("key", nargs="?", default=None, help="the key (default: read from stdin)")


def cmd_keys_hash(args: argparse.Namespace) -> int:
    from autocontour.server.auth import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0


def _pid1_is_worker() -> bool:
    try:
        argv = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a.endswith(b"autocontour") for a in argv) and b"worker" in argv


def add_health_command(commands: argparse._SubParsersAction) -> None:
    health = add_command(commands, "health", cmd_health,
                         help="container health check: the API answers, or a worker reaches its broker")
    health.add_argument("--url", default="http://127.0.0.1:8000/healthz")
    health.add_argument("--worker", action="store_true", help="check the broker (default: when PID 1 is a worker)")


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when healthy, 1 with one line otherwise. A worker container (PID 1 runs `autocontour worker`, or
    --worker) is healthy when it reaches its Redis broker; otherwise the API must answer --url."""
    try:
        if args.worker or _pid1_is_worker():
            from kombu import Connection

            from autocontour.server.settings import ServerSettings

            with Connection(ServerSettings().broker_url, connect_timeout=4) as connection:
                connection.ensure_connection(max_retries=1, timeout=4)
            print("healthy: broker reachable")
        else:
            import httpx

            httpx.get(args.url, timeout=4).raise_for_status()
            print(f"healthy: {args.url} answers")
        return 0
    except Exception as exc:  # any failure is "unhealthy", said in one line
        print(f"autocontour: unhealthy: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return 1
