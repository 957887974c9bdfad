"""Distributed mode: one API process, two real Celery workers, a real redis-server; nothing lost."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import time
from datetime import datetime

import httpx
import pytest
import redis as redis_client
from conftest import EXAMPLE_CT
from redis_server import start_redis
from servers import service_env, start_server, start_worker
from test_server import read_zip, upload

VISIBILITY_S = 30
WORKER_TIMEOUT_S = 6  # AUTOCONTOUR_WORKER_TIMEOUT_S: a worker silent this long is dead
HEARTBEAT_S = 2


@pytest.fixture()
def cluster(tmp_path, small_weights):
    """Redis + API (queue=celery) + two workers sharing one data folder."""
    redis = start_redis(tmp_path / "redis")
    data = tmp_path / "shared"
    settings = dict(queue="celery", broker_url=redis.url, visibility_timeout_s=VISIBILITY_S, threads=1, max_queue=64,
                    worker_timeout_s=WORKER_TIMEOUT_S)
    env = service_env(data, small_weights, **settings)
    data.mkdir(parents=True)
    workers = [start_worker(env, f"w{i}@test", data) for i in (1, 2)]
    api = start_server(data, small_weights, **settings)
    state = {"redis": redis, "api": api, "workers": workers, "env": env, "data": data, "settings": settings,
             "weights": small_weights}
    yield state
    state["api"].stop()  # the test may have replaced the API with a restarted one
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
    probes = readiness_while_both_workers_busy(url)
    assert all(code == 200 for code, _ in probes), probes  # busy workers are alive workers
    seconds = sorted(s for _, s in probes)
    print(f"/readyz while both workers were busy: {len(probes)} polls, "
          f"median {seconds[len(seconds) // 2] * 1000:.1f} ms, slowest {seconds[-1] * 1000:.1f} ms")
    jobs = wait_listed(url, [r.json()["id"] for r in responses])  # the list follows the workers by itself
    assert all(j["status"] == "done" for j in jobs.values())
    assert {j["result"]["worker"] for j in jobs.values()} == {"w1@test", "w2@test"}
    masks = {read_zip(httpx.get(f"{url}/v1/segmentations/{i}/result").content)["bladder.nii.gz"] for i in jobs}
    assert len(masks) == 1  # every job gave the same, correct mask
    figures = httpx.get(f"{url}/metrics").text
    assert 'autocontour_worker_up{worker="w1@test"} 1.0' in figures and "autocontour_workers_alive 2.0" in figures
    done = sum(float(line.rsplit(" ", 1)[1]) for line in figures.splitlines()
               if line.startswith('autocontour_worker_jobs_total{') and 'status="done"' in line)
    assert done == 20


def readiness_while_both_workers_busy(url: str, polls: int = 20) -> list[tuple[int, float]]:
    """/readyz answers (status, seconds) polled while /metrics says both workers run a job."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        busy = [line for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith("autocontour_worker_busy{") and line.endswith(" 1.0")]
        if len(busy) == 2:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the two workers were never busy together")
    probes = []
    for _ in range(polls):
        started = time.perf_counter()
        code = httpx.get(f"{url}/readyz", timeout=10).status_code
        probes.append((code, time.perf_counter() - started))
        time.sleep(0.1)
    return probes


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
    killed_at = time.monotonic()
    # within the documented time (the worker timeout, plus a heartbeat round each side), the job record says so
    while True:
        job = httpx.get(f"{url}/v1/segmentations/{killed_job}").json()
        if job["progress"].get("worker") != victim.name and any(victim.name in n for n in job["notes"]):
            break
        assert time.monotonic() - killed_at < WORKER_TIMEOUT_S + 3 * HEARTBEAT_S, job
        time.sleep(0.2)
    handed_back_s = time.monotonic() - killed_at
    assert job["status"] in ("queued", "running") and "stopped during attempt 1" in " ".join(job["notes"])
    jobs = wait_all(url, ids, timeout=600)
    assert all(j["status"] == "done" for j in jobs.values()), {k: j["status"] for k, j in jobs.items()}
    assert jobs[killed_job]["result"]["worker"] == "w2@test"  # finished by the survivor
    assert jobs[killed_job]["result"]["attempt"] == 2 and jobs[killed_job]["progress"]["attempt"] == 2
    print(f"after kill -9: handed back in {handed_back_s:.1f} s, done {time.monotonic() - killed_at:.1f} s after")
    assert "autocontour_jobs_requeued_total 1.0" in httpx.get(f"{url}/metrics").text


def test_redis_restart_loses_no_accepted_job(cluster):
    url = cluster["api"].url
    for w in cluster["workers"]:
        w.kill(signal.SIGTERM)  # nobody consumes: the jobs wait in Redis
    accepted = [upload(url, EXAMPLE_CT, {"structures": "bladder"}) for _ in range(4)]
    assert [r.status_code for r in accepted] == [202] * 4  # accepted, and told that no worker is alive
    assert all("no worker was alive" in " ".join(r.json()["notes"]) for r in accepted)
    ids = [r.json()["id"] for r in accepted]
    figures = httpx.get(f"{url}/metrics").text
    assert figures.count("autocontour_queue_depth 4.0") == 1
    assert "autocontour_uploads_without_worker_total 4.0" in figures
    assert "autocontour_workers_alive 0.0" in figures
    not_ready = httpx.get(f"{url}/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["worker_running"] is False
    cluster["redis"].stop()
    cluster["redis"].start()  # same port and folder: the append-only file brings the tasks back
    cluster["api"].stop()  # the jobs run while the API is down
    cluster["workers"] = [start_worker(cluster["env"], "w3@test", cluster["data"])]
    broker = redis_client.Redis.from_url(cluster["redis"].url)
    deadline = time.monotonic() + 600
    while not all(json.loads(broker.get(f"celery-task-meta-{i}") or "{}").get("status") == "SUCCESS" for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(1.5)  # the API comes back clearly later than the last job finished
    restarted = datetime.now().astimezone()
    cluster["api"] = start_server(cluster["data"], cluster["weights"], **cluster["settings"])
    jobs = wait_all(cluster["api"].url, ids)
    assert all(j["status"] == "done" for j in jobs.values())
    for job in jobs.values():  # when the jobs ran, not when the API learnt of it
        started, finished = datetime.fromisoformat(job["started"]), datetime.fromisoformat(job["finished"])
        assert started <= finished < restarted, job


REDIS_OUTAGE_S = 10


def wait_running(url: str, ids: list[str], timeout: float = 180) -> dict[str, dict]:
    """The jobs once all of them are running, each on its own worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {i: httpx.get(f"{url}/v1/segmentations/{i}").json() for i in ids}
        workers = {j["progress"].get("worker") for j in jobs.values() if j["status"] == "running"}
        if len(workers - {None}) == len(ids):
            return jobs
        time.sleep(0.2)
    raise AssertionError("the jobs never ran together")


@pytest.mark.parametrize("outage", ["kill -9", "redis-cli shutdown"])
def test_a_redis_restart_under_two_running_jobs_leaves_none_running(cluster, outage):
    """Both jobs end, done or failed with a reason that says what happened, and none is shown running after."""
    url = cluster["api"].url
    ids = [upload(url, EXAMPLE_CT, {"structures": "bladder,anorectum,ctvn"}).json()["id"] for _ in range(2)]
    wait_running(url, ids)
    redis = cluster["redis"]
    redis.kill() if outage == "kill -9" else redis.shutdown()
    time.sleep(REDIS_OUTAGE_S)
    redis.start()
    back = time.monotonic()
    jobs = wait_all(url, ids, timeout=300)
    ended_s = time.monotonic() - back
    print(f"after {outage} and {REDIS_OUTAGE_S} s without Redis: "
          f"{ {i[:8]: j['status'] for i, j in jobs.items()} } {ended_s:.1f} s after Redis returned")
    for job in jobs.values():
        assert job["status"] == "done" or "broker" in job["error"]["detail"], job
        if job["status"] == "done":
            assert set(read_zip(httpx.get(f"{url}/v1/segmentations/{job['id']}/result").content)) >= {
                "bladder.nii.gz", "anorectum.nii.gz", "ctvn.nii.gz"}
    listed = httpx.get(f"{url}/v1/segmentations", params={"limit": 500}).json()
    assert not [j["id"] for j in listed if j["status"] in ("running", "queued")]


def test_a_redelivered_job_whose_upload_is_gone_fails_saying_why(cluster):
    """What a worker finds when an earlier attempt ended (removing the upload) but its outcome never reached
    Redis: no upload, no result. It says so, rather than "file not found"."""
    url = cluster["api"].url
    for w in cluster["workers"]:
        w.kill(signal.SIGTERM)
    job_id = upload(url, EXAMPLE_CT, {"structures": "bladder"}).json()["id"]
    uploads = cluster["data"] / "uploads" / job_id
    assert any(uploads.iterdir())
    shutil.rmtree(uploads)
    cluster["workers"] = [start_worker(cluster["env"], "w3@test", cluster["data"])]
    job = wait_all(url, [job_id], timeout=120)[job_id]
    assert job["status"] == "failed" and job["error"]["title"] == "Outcome lost", job
    assert "broker was unreachable" in job["error"]["detail"] and "submit the CT again" in job["error"]["detail"]
