"""A dead-lettered job can be driven again under its own job ID, through the CLI (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_producers_cli import cli
from worker_harness import Deployment, running

from worker.contracts import JobStatus

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    # no retry window: the first transient fault dead-letters (here: the keyring is briefly missing)
    yield from running(service_env, seaweed, tmp_path, CANCELABLE_WORKER__TRANSIENT_RETRY_WINDOW="0")


def test_a_dead_lettered_job_is_redriven_by_the_cli(dep: Deployment) -> None:
    c = dep.client
    hidden = dep.keyring.with_name("keyring.hidden")
    dep.keyring.rename(hidden)
    try:
        jid = c.submit(c.enroll_job("acme", "redriven", [dep.faces["obama"]], "k1"))
        dead = c.wait(jid, timeout=300)
    finally:
        hidden.rename(dep.keyring)
    assert dead.status == JobStatus.DEAD_LETTERED, dead
    assert jid in c.dead_letters()

    r = cli(["redrive", jid], dep.env)
    assert r.returncode == 0 and f"{jid}: queued again" in r.stdout, (r.stdout, r.stderr)
    done = c.wait(jid, timeout=300)
    assert done.status == JobStatus.SUCCEEDED and done.version == 1, done
    assert jid not in c.dead_letters()
    # the S3 dead letter stays as the record of what happened
    assert dep.s3.head_object(Bucket=dep.bucket, Key=f"tenants/acme/dead-letters/{jid.split('/')[1]}.json")

    r = cli(["redrive", jid], dep.env)  # nothing to redrive any more
    assert r.returncode == 1 and "no dead letter" in r.stdout
