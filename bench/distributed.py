"""Throughput of the distributed mode: one worker against two, same jobs, same machine.

Starts a real redis-server, one API process (AUTOCONTOUR_QUEUE=celery) and N
worker processes, submits the same example-CT jobs, and times until every job
is done. On this 2-core machine both setups share the same two cores (one
worker with 2 threads vs two workers with 1 thread each), so this measures the
overhead and balance of the queue, not added hardware; on a multi-GPU host each
worker has its own GPU.

    python bench/distributed.py [--jobs 6] [--structures bladder,anorectum,ctvn]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import start_redis  # noqa: E402
from servers import service_env, start_server, start_worker  # noqa: E402

from autocontour.config import Settings  # noqa: E402

CT = ROOT / "examples" / "pelvis_ct" / "ct.nii.gz"


def run(workers: int, threads: int, jobs: int, structures: str, weights: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis = start_redis(tmp / "redis")
        settings = dict(queue="celery", broker_url=redis.url, threads=threads, max_queue=100, warmup=True,
                        cpu_support_size=str(Settings().cpu_support_size))  # the CPU default, not the tests' 2
        env = service_env(tmp / "data", weights, **settings)
        (tmp / "data").mkdir()
        procs = [start_worker(env, f"w{i}@bench", tmp / "data") for i in range(workers)]
        api = start_server(tmp / "data", weights, **settings)
        try:
            started = time.perf_counter()
            ids = []
            for _ in range(jobs):
                with open(CT, "rb") as f:
                    r = httpx.post(f"{api.url}/v1/segmentations", files={"file": ("ct.nii.gz", f)},
                                   data={"structures": structures}, timeout=120)
                r.raise_for_status()
                ids.append(r.json()["id"])
            pending = set(ids)
            while pending:
                for job_id in list(pending):
                    status = httpx.get(f"{api.url}/v1/segmentations/{job_id}").json()["status"]
                    if status in ("done", "failed", "cancelled"):
                        assert status == "done", status
                        pending.discard(job_id)
                time.sleep(0.5)
            return time.perf_counter() - started
        finally:
            api.stop()
            for p in procs:
                p.kill(signal.SIGTERM)
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--structures", default="bladder,anorectum,ctvn")
    parser.add_argument("--weights", type=Path, default=Settings().default_weights)
    args = parser.parse_args()
    one = run(1, 2, args.jobs, args.structures, args.weights)
    print(f"1 worker  (2 threads): {args.jobs} jobs in {one:.1f} s = {args.jobs / one * 60:.2f} jobs/min")
    two = run(2, 1, args.jobs, args.structures, args.weights)
    print(f"2 workers (1 thread each): {args.jobs} jobs in {two:.1f} s = {args.jobs / two * 60:.2f} jobs/min")
    print(f"throughput_ratio_two_vs_one={one / two:.2f}")


if __name__ == "__main__":
    main()
