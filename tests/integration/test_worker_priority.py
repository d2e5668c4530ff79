"""Interactive work before background work, against a real worker: a verify queued after 50 bulk enrolments starts
before every one of them (the worker polls ``engine.interactive`` before ``engine.bulk``: ``worker.broker.order``),
and an old producer's message on the single ``engine`` queue of earlier releases is still served."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from worker_harness import job_id, running, start_worker, wait_ready

from worker.broker.config import LEGACY_ENGINE_QUEUE, TASK_VERIFY
from worker.contracts import JobStatus, to_wire

pytestmark = pytest.mark.integration

BULK = 50


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def test_a_verify_queued_after_50_bulk_jobs_starts_before_them(dep) -> None:
    c = dep.client
    enrolled = c.submit(c.enroll_job("acme", "ann", [dep.faces["obama"]], "k1", job_id=job_id("enr")))
    assert c.wait(enrolled, timeout=120).status == JobStatus.SUCCEEDED
    # a result is stored before its message is acknowledged: stopping the worker in between re-queues the enrolment
    # (its pool child dies with the stop), so wait for the acknowledgement (kombu's ``unacked`` hash empties)
    deadline = time.monotonic() + 30
    while c.redis.hlen("unacked"):
        assert time.monotonic() < deadline, "the enrolment was never acknowledged"
        time.sleep(0.05)

    # nothing consumes while the queues fill: the worker is stopped, then started on the full queues
    dep.worker.stop()
    bulk = [
        c.enroll_job("acme", f"bulk-{i:02d}", [dep.faces["obama"]], "k1", job_id=job_id(f"b{i:02d}"))
        for i in range(BULK)
    ]
    c.submit_many(bulk, background=True)
    probe = c.verify_job("acme", "ann", dep.faces["obama2"], job_id=job_id("v"))
    c.submit(probe)  # queued after every bulk job
    assert c.redis.llen("engine.bulk") == BULK and c.redis.llen("engine.interactive") == 1
    # -Q lists the bulk queue first: the polling order is the product's, not the command line's
    queues = "engine.bulk,control,engine,engine.interactive"
    dep.worker = start_worker(dep.env, dep.tmp / "worker2.log", queues=queues, pool="prefork", concurrency=1)
    wait_ready(c, dep.worker, timeout=120)

    verify = c.wait(probe, timeout=120)
    assert verify.status == JobStatus.SUCCEEDED
    assert c.redis.llen("engine.bulk") > 0, "the verify was answered while bulk work still waited"
    results = [c.wait(j, timeout=600) for j in bulk]
    assert all(r.status == JobStatus.SUCCEEDED for r in results)
    first_bulk = min(r.started_at for r in results if r.started_at is not None)
    assert verify.started_at is not None and verify.started_at < first_bulk
    assert verify.finished_at is not None and verify.finished_at <= first_bulk


def test_a_message_on_the_legacy_engine_queue_is_still_served(dep) -> None:
    """A producer of an earlier release sends to ``engine``; workers drain it during the upgrade."""
    c = dep.client
    probe = c.verify_job("acme", "nobody", dep.faces["obama"], job_id=job_id("old"))
    c.app.send_task(TASK_VERIFY, args=[to_wire(probe)], task_id=probe.ref, queue=LEGACY_ENGINE_QUEUE)
    res = c.wait(probe, timeout=120)
    assert res.status == JobStatus.FAILED and res.error is not None and res.error.code == "no_template"
