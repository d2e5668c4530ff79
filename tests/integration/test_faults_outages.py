"""Outages of the services a worker needs, during a 20-row bulk job (docs/reliability.md).

- SeaweedFS stopped for 60 s: every row still succeeds, nothing is dead-lettered (transient faults are retried
  with backoff for ``worker.transient_retry_window``);
- Redis SIGKILLed and restarted (AOF on): every row succeeds, each subject has exactly one version.

Each scenario runs on private services (its own SeaweedFS / its own Redis), so the rest of the session is unaffected.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest
from worker_harness import Deployment, deploy

from worker.contracts import JobStatus

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

ROWS = 20


def _manifest(dep: Deployment, tmp_path: Path) -> Path:
    faces = list(dep.faces.values())
    m = tmp_path / "bulk.csv"
    m.write_text("subject,image\n" + "".join(f"row{i:02d},{faces[i % len(faces)]}\n" for i in range(ROWS)))
    return m


def _versions(dep: Deployment, subject: str) -> list[str]:
    r = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix=f"tenants/acme/subjects/{subject}/versions/")
    return [o["Key"] for o in r.get("Contents", [])]


def _wait_succeeded(dep: Deployment, bulk_id: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while dep.client.book.progress(bulk_id).succeeded < n:
        assert time.monotonic() < deadline, dep.worker.tail()
        time.sleep(0.2)


def _respawn(proc, log: Path):  # the same command line: same ports, same data directory
    from tests.integration.conftest import Proc

    with open(log, "ab") as f:
        argv = proc.popen.args
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)
    return Proc(p, log)


def test_a_60s_s3_outage_during_a_bulk_loses_nothing(service_env, tmp_path: Path) -> None:
    from tests.integration.conftest import start_seaweed

    svc = start_seaweed(tmp_path / "weed")
    dep = deploy(
        service_env,
        svc,
        tmp_path,
        CANCELABLE_S3__ENDPOINT_URL=svc.endpoint,
        CANCELABLE_S3__ACCESS_KEY_ID=svc.access_key,
        CANCELABLE_S3__SECRET_ACCESS_KEY=svc.secret_key,
        CANCELABLE_S3__MAX_ATTEMPTS="2",
        CANCELABLE_S3__CONNECT_TIMEOUT="2",
    )
    weed = svc.proc
    try:
        c = dep.client
        bulk_id = c.submit(c.bulk_job("acme", "k1", str(_manifest(dep, tmp_path)), chunk_size=4))
        _wait_succeeded(dep, bulk_id, 3)
        assert weed is not None
        weed.stop()
        time.sleep(60)
        weed = _respawn(weed, weed.log)
        res = c.wait(bulk_id, timeout=600)
        assert res.status == JobStatus.SUCCEEDED and res.succeeded == ROWS and res.failed == 0, (res, dep.worker.tail())
        assert c.dead_letters() == []
        assert all(len(_versions(dep, f"row{i:02d}")) == 1 for i in range(ROWS))
        assert "transient" in dep.worker.log.read_text()  # the outage was really met, and ridden out
    finally:
        dep.worker.stop()
        dep.client.close()
        if weed is not None:
            weed.stop()


def test_a_redis_crash_during_a_bulk_loses_nothing(service_env, seaweed, tmp_path: Path) -> None:
    import redis

    from tests.integration.conftest import free_ports

    (port,) = free_ports(1)
    rdir = tmp_path / "redis"
    rdir.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir), "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
    log = rdir / "redis.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(redis.exceptions.ConnectionError):
            if redis.Redis.from_url(url).ping():
                break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    dep = deploy(
        service_env,
        seaweed,
        tmp_path,
        CANCELABLE_REDIS__URL=url,
        CANCELABLE_WORKER__TASK_TIME_LIMIT="20",
        CANCELABLE_WORKER__VISIBILITY_TIMEOUT="30",  # a message whose ack was lost comes back within a minute
    )
    try:
        c = dep.client
        bulk_id = c.submit(c.bulk_job("acme", "k1", str(_manifest(dep, tmp_path)), chunk_size=4))
        _wait_succeeded(dep, bulk_id, 4)
        proc.kill()  # SIGKILL: no shutdown save; only the AOF survives
        proc.wait(10)
        time.sleep(2)
        with open(log, "ab") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        res = None
        while res is None:
            assert time.monotonic() < deadline, dep.worker.tail()
            with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                res = c.result(bulk_id)
            time.sleep(0.5)
        assert res.status == JobStatus.SUCCEEDED and res.succeeded == ROWS, (res, dep.worker.tail())
        assert all(len(_versions(dep, f"row{i:02d}")) == 1 for i in range(ROWS))
        assert dep.worker.alive()
    finally:
        dep.worker.stop()
        dep.client.close()
        proc.kill()
