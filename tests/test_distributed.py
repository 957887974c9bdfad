"""Distributed mode: one API process, two real Celery workers, a real redis-server; nothing lost."""

from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest
from conftest import EXAMPLE_CT
from redis_server import start_redis
from servers import service_env, start_server, start_worker
from test_server import read_zip, upload

VISIBILITY_S = 30


@pytest.fixture()
def cluster(tmp_path, small_weights):
    """Redis + API (queue=celery) + two workers sharing one data folder."""
    redis = start_redis(tmp_path / "redis")
    data = tmp_path / "shared"
    settings = dict(queue="celery", broker_url=redis.url, visibility_timeout_s=VISIBILITY_S, threads=1, max_queue=64)
    env = service_env(data, small_weights, **settings)
    data.mkdir(parents=True)
    workers = [start_worker(env, f"w{i}@test", data) for i in (1, 2)]
    api = start_server(data, small_weights, **settings)
    state = {"redis": redis, "api": api, "workers": workers, "env": env, "data": data}
    yield state
    api.stop()
    for w in state["workers"]:
        w.kill(signal.SIGTERM)
    state["redis"].stop()


def wait_all(url: str, ids: list[str], timeout: float = 600) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in jobs or jobs[job_id]["status"] not in ("done", "failed", "cancelled"):
                jobs[job_id] = httpx.get(f"{url}/v1/segmentations/{job_id}").json()
        if all(j["status"] in ("done", "failed", "cancelled") for j in jobs.values()):
            return jobs
        time.sleep(0.5)
    raise AssertionError({k: v["status"] for k, v in jobs.items()})


def wait_listed(url: str, ids: list[str], timeout: float = 600) -> dict[str, dict]:
    """Like wait_all, but reading only the job list: no job is ever fetched on its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in httpx.get(f"{url}/v1/segmentations", params={"limit": 500}).json()}
        if all(jobs[i]["status"] in ("done", "failed", "cancelled") for i in ids):
            return {i: jobs[i] for i in ids}
        time.sleep(0.5)
    raise AssertionError({i: jobs[i]["status"] for i in ids})


def test_twenty_uploads_spread_over_two_workers(cluster):
    url = cluster["api"].url
    model = httpx.get(f"{url}/v1/model").json()
    assert model["device"] == "separate workers" and model["name"] == "test-small"
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["model"] == "card loaded; network runs in workers"
    assert ready["checks"]["broker_reachable"] and ready["checks"]["worker_running"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: upload(url, EXAMPLE_CT, {"structures": "bladder"}), range(20)))
    assert [r.status_code for r in responses] == [202] * 20
    jobs = wait_listed(url, [r.json()["id"] for r in responses])  # the list follows the workers by itself
    assert all(j["status"] == "done" for j in jobs.values())
    assert {j["result"]["worker"] for j in jobs.values()} == {"w1@test", "w2@test"}
    masks = {read_zip(httpx.get(f"{url}/v1/segmentations/{i}/result").content)["bladder.nii.gz"] for i in jobs}
    assert len(masks) == 1  # every job gave the same, correct mask


def test_a_worker_killed_mid_job_loses_nothing(cluster):
    url = cluster["api"].url
    ids = [upload(url, EXAMPLE_CT, {"structures": "bladder,anorectum,ctvn"}).json()["id"] for _ in range(4)]
    victim = cluster["workers"][0]
    deadline = time.monotonic() + 120
    killed_job = None
    while killed_job is None and time.monotonic() < deadline:
        for job_id in ids:
            job = httpx.get(f"{url}/v1/segmentations/{job_id}").json()
            if job["status"] == "running" and job["progress"].get("worker") == victim.name:
                killed_job = job_id
                break
        time.sleep(0.1)
    assert killed_job, "the victim never ran a job"
    victim.kill(signal.SIGKILL)
    jobs = wait_all(url, ids, timeout=600)
    assert all(j["status"] == "done" for j in jobs.values()), {k: j["status"] for k, j in jobs.items()}
    assert jobs[killed_job]["result"]["worker"] == "w2@test"  # finished by the survivor


def test_redis_restart_loses_no_accepted_job(cluster):
    url = cluster["api"].url
    for w in cluster["workers"]:
        w.kill(signal.SIGTERM)  # nobody consumes: the jobs wait in Redis
    ids = [upload(url, EXAMPLE_CT, {"structures": "bladder"}).json()["id"] for _ in range(4)]
    assert httpx.get(f"{url}/metrics").text.count("autocontour_queue_depth 4.0") == 1
    cluster["redis"].stop()
    cluster["redis"].start()  # same port and folder: the append-only file brings the tasks back
    cluster["workers"] = [start_worker(cluster["env"], "w3@test", cluster["data"])]
    jobs = wait_all(url, ids)
    assert all(j["status"] == "done" for j in jobs.values())
