"""Crashes mid-job: a pool child SIGKILLed (re-queued at once), the whole worker SIGKILLed and restarted (re-delivered
after the visibility timeout), and a job that kills its worker every time (dead-lettered after max_attempts). Each
completes exactly once: one version in S3, attempts counted from task start."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from worker_harness import Deployment, deploy, start_worker, wait_ready  # noqa: F401

from worker.contracts import JobStatus

pytestmark = pytest.mark.integration

VT = 24  # visibility timeout of these workers (s); the hard time limit is below it


@pytest.fixture
def crashy(service_env, seaweed, tmp_path: Path):
    dep = deploy(
        service_env, seaweed, tmp_path,
        CANCELABLE_WORKER__TASK_TIME_LIMIT=str(VT - 4), CANCELABLE_WORKER__VISIBILITY_TIMEOUT=str(VT),
        CANCELABLE_WORKER__MAX_ATTEMPTS="3", CANCELABLE_ENGINE__STEPS="20",
    )
    try:
        yield dep
    finally:
        dep.worker.stop()
        dep.client.close()


def _wait_attempt(dep: Deployment, job_id: str, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    import redis

    while time.monotonic() < deadline:
        try:
            v = dep.client.redis.get(f"cf:attempts:{job_id}")
        except redis.exceptions.TimeoutError:  # an overloaded CI box: keep polling
            continue
        if v is not None and int(v) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"attempt {n} of {job_id} never started:\n{dep.worker.tail()}")


def _versions(dep: Deployment, subject: str) -> list[str]:
    r = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix=f"tenants/acme/subjects/{subject}/versions/")
    return [o["Key"].rsplit("/", 1)[-1] for o in r.get("Contents", [])]


def test_pool_child_killed_mid_job_completes_once(crashy: Deployment) -> None:
    dep = crashy
    job = dep.client.enroll_job("acme", "child-kill", [dep.faces["obama"], dep.faces["obama2"]], "k1")
    dep.client.submit(job)
    _wait_attempt(dep, job.job_id, 1)
    time.sleep(0.5)  # inside the job (download / align / optimise)
    (child,) = dep.worker.children()
    os.kill(child, signal.SIGKILL)
    res = dep.client.wait(job.job_id, timeout=180)
    assert res.status == JobStatus.SUCCEEDED, res
    assert res.attempts == 2 and res.version == 1
    assert _versions(dep, "child-kill") == ["0000000001.json"]
    assert dep.worker.alive() and dep.worker.children() and dep.worker.children() != [child]


def test_whole_worker_killed_mid_job_completes_once_after_restart(crashy: Deployment) -> None:
    dep = crashy
    job = dep.client.enroll_job("acme", "worker-kill", [dep.faces["obama"], dep.faces["obama2"]], "k1")
    dep.client.submit(job)
    _wait_attempt(dep, job.job_id, 1)
    time.sleep(0.5)
    dep.worker.kill(signal.SIGKILL)  # main process and pool child at once: nothing gets acked or re-queued
    assert not dep.worker.alive()
    assert dep.client.result(job.job_id) is None
    t0 = time.monotonic()
    dep.restart()
    res = dep.client.wait(job.job_id, timeout=VT + 120)
    waited = time.monotonic() - t0
    assert res.status == JobStatus.SUCCEEDED, res
    assert res.attempts == 2 and res.version == 1
    assert _versions(dep, "worker-kill") == ["0000000001.json"]
    assert waited >= VT - 8  # came back through the visibility timeout, not a duplicate publish


def test_job_that_keeps_killing_its_worker_is_dead_lettered(crashy: Deployment) -> None:
    dep = crashy
    job = dep.client.enroll_job("acme", "poison", [dep.faces["obama"]], "k1")
    dep.client.submit(job)
    for attempt in (1, 2, 3):  # max_attempts = 3: every start is counted, every one is killed
        _wait_attempt(dep, job.job_id, attempt)
        time.sleep(0.3)
        for pid in dep.worker.children():
            os.kill(pid, signal.SIGKILL)
    res = dep.client.wait(job.job_id, timeout=180)
    assert res.status == JobStatus.DEAD_LETTERED, res
    assert res.error.code == "dead_lettered" and res.attempts == 3
    dl = dep.client.book.get_dead_letter(job.job_id)
    assert dl is not None and dl["attempts"] == 3 and dl["job"]["job_id"] == job.job_id
    s3_dl = json.loads(dep.s3.get_object(Bucket=dep.bucket, Key=f"tenants/acme/dead-letters/{job.job_id}.json")
                       ["Body"].read())
    assert s3_dl["job_kind"] == "enroll" and s3_dl["attempts"] == 3
    assert job.job_id in dep.client.book.dead_letters()
    assert _versions(dep, "poison") == []
    # the worker serves the next job normally
    ok = dep.client.run(dep.client.enroll_job("acme", "after-poison", [dep.faces["obama"]], "k1"), timeout=180)
    assert ok.status == JobStatus.SUCCEEDED
