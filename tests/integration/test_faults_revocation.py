"""Fault scenarios of revocation and tenancy against real Redis, SeaweedFS and worker processes (docs/reliability.md).

- an enrolment in flight while its subject is revoked can never become current under the revoked key version;
- a tenant's revocation of a key touches only that tenant;
- a job may read only its tenant's inputs, never the output bucket, and learns nothing about other objects.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from worker_harness import Deployment, job_id, running, start_worker, wait_ready

from worker.contracts import JobStatus, to_wire

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RUNS = int(os.environ.get("CANCELABLE_FAULT_RUNS", "10"))
SLOW_STEPS = "400"  # the in-flight enrolment: long enough that a revocation lands while it optimises


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def _json(dep: Deployment, key: str) -> dict | None:
    try:
        return json.loads(dep.s3.get_object(Bucket=dep.bucket, Key=key)["Body"].read())
    except dep.s3.exceptions.NoSuchKey:
        return None


def _keys(dep: Deployment, prefix: str) -> list[str]:
    out: list[str] = []
    for page in dep.s3.get_paginator("list_objects_v2").paginate(Bucket=dep.bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def _subject_state(dep: Deployment, tenant: str, subject: str) -> tuple[dict, dict, dict[int, dict], dict[int, dict]]:
    """(current pointer, key record, manifests by version, revocation records by version)."""
    base = f"tenants/{tenant}/subjects/{subject}/"
    pointer = _json(dep, base + "current.json")
    key = _json(dep, base + "key.json")
    assert pointer is not None and key is not None
    manifests = {int(k.rsplit("/", 1)[1][:10]): _json(dep, k) for k in _keys(dep, base + "versions/")}
    revocations = {int(k.rsplit("/", 1)[1][:10]): _json(dep, k) for k in _keys(dep, base + "revocations/")}
    return pointer, key, manifests, revocations  # type: ignore[return-value]


def test_revoke_during_an_inflight_enrol_is_never_undone(dep: Deployment, tmp_path: Path) -> None:
    """An enrolment derives its seed under key version n, a revocation of the subject commits n+1 meanwhile: the
    enrolment's commit is fenced off (marked revoked) and re-derived; the current version is always under the
    subject's newest key version and every version under an older one is marked revoked."""
    from worker.broker.config import TASK_ENROLL
    from worker.storage.jobbook import JobBook  # noqa: F401  (documents where attempts are counted)

    c = dep.client
    first = c.wait(c.submit(c.enroll_job("acme", "fence", [dep.faces["obama"]], "k1")), timeout=300)
    assert first.status == JobStatus.SUCCEEDED, first
    # a second engine worker that alone consumes the "slow" queue, with many optimisation steps
    slow = start_worker(
        {**dep.env, "CANCELABLE_ENGINE__STEPS": SLOW_STEPS}, tmp_path / "slow.log", queues="slow", name="slow"
    )
    try:
        wait_ready(c, dep.worker)
        for run in range(RUNS):
            job = c.enroll_job("acme", "fence", [dep.faces["obama2"]], "k1", job_id=job_id(f"inflight{run}"))
            c.app.send_task(TASK_ENROLL, args=[to_wire(job)], task_id=job.job_id, queue="slow", ignore_result=True)
            deadline = time.monotonic() + 120
            while c.book.attempts(job.ref) < 1:  # the slow worker picked it up (and derives right away)
                assert time.monotonic() < deadline, slow.tail()
                time.sleep(0.05)
            time.sleep(0.5)
            rv = c.wait(c.submit(c.revoke_job("acme", "fault test", subject="fence")), timeout=300)
            assert rv.status == JobStatus.SUCCEEDED, rv
            en = c.wait(job.ref, timeout=300)
            assert en.status == JobStatus.SUCCEEDED, (en, slow.tail())

            pointer, key, manifests, revocations = _subject_state(dep, "acme", "fence")
            cur = manifests[pointer["version"]]
            assert (cur["key_id"], cur["key_version"]) == (key["key_id"], key["key_version"]), (pointer, key)
            assert pointer["key_epoch"] == len(key["history"]) + 1 == cur["key_epoch"]
            assert pointer["version"] not in revocations
            for v, m in manifests.items():
                if (m["key_id"], m["key_version"]) != (key["key_id"], key["key_version"]):
                    assert v in revocations, f"run {run}: version {v} under a revoked key version is unmarked"
            assert en.key_version == key["key_version"], "the enrolment's result names the version it made"
        fenced_runs = slow.log.read_text().count("enrol fenced off by a revocation")
    finally:
        slow.stop()
    # the scenario really raced: the fence refused in-flight commits (before or after their manifest was written)
    assert fenced_runs >= 1, "no run exercised the fence; raise SLOW_STEPS"


def test_key_revocation_is_scoped_to_its_tenant(dep: Deployment) -> None:
    c = dep.client
    beta_face = dep.upload_input(
        "beta", "obama.jpg", dep.s3.get_object(Bucket=dep.input_bucket, Key="tenants/acme/obama.jpg")["Body"].read()
    )
    for tenant, face in (("acme", dep.faces["obama"]), ("beta", beta_face)):
        r = c.wait(c.submit(c.enroll_job(tenant, "shared-key", [face], "k1")), timeout=300)
        assert r.status == JobStatus.SUCCEEDED, r
    rv = c.wait(c.submit(c.revoke_job("acme", "leak", key_id="k1", new_key_id="k2")), timeout=300)
    assert rv.status == JobStatus.SUCCEEDED and rv.subjects_done == 1, rv

    # acme: moved to k2, old version revoked, k1 refused for new acme enrolments
    pointer, key, _, revocations = _subject_state(dep, "acme", "shared-key")
    assert key["key_id"] == "k2" and 1 in revocations
    r = c.wait(c.submit(c.enroll_job("acme", "new-subject", [dep.faces["obama"]], "k1")), timeout=300)
    assert r.status == JobStatus.FAILED and r.error.code == "revoked_key"
    # beta: untouched; verifies and enrols under k1 as before
    pointer, key, manifests, revocations = _subject_state(dep, "beta", "shared-key")
    assert key["key_id"] == "k1" and key["history"] == [] and revocations == {} and list(manifests) == [1]
    v = c.wait(c.submit(c.verify_job("beta", "shared-key", beta_face)), timeout=300)
    assert v.status == JobStatus.SUCCEEDED, v
    r = c.wait(c.submit(c.enroll_job("beta", "another", [beta_face], "k1")), timeout=300)
    assert r.status == JobStatus.SUCCEEDED, r
    assert _json(dep, "tenants/acme/keys/k1/state.json")["state"] == "revoked"
    assert _json(dep, "tenants/beta/keys/k1/state.json") is None


def test_inputs_are_confined_to_the_tenant(dep: Deployment) -> None:
    """Tenant beta cannot read acme's inputs, nor anything in the output bucket (acme's stored cancelable images),
    and the refusal is the same whether or not the object exists (no existence oracle)."""
    c = dep.client
    done = c.wait(c.submit(c.enroll_job("acme", "victim", [dep.faces["obama"]], "k1")), timeout=300)
    assert done.status == JobStatus.SUCCEEDED
    attempts = {
        "acme-input": dep.faces["obama2"],
        "acme-input-missing": f"s3://{dep.input_bucket}/tenants/acme/nope.jpg",
        "acme-cancelable-image": done.image_uris[0],
        "output-bucket-missing": f"s3://{dep.bucket}/tenants/acme/nope.png",
        "prefix-lookalike": f"s3://{dep.input_bucket}/tenants/beta2/x.jpg",
    }
    for name, ref in attempts.items():
        r = c.wait(c.submit(c.enroll_job("beta", f"thief-{name}", [ref], "k1")), timeout=300)
        assert r.status == JobStatus.FAILED and r.error.code == "forbidden_input", (name, r)
        assert "nope" not in r.error.message or "outside the inputs allowed" in r.error.message
        assert _keys(dep, f"tenants/beta/subjects/thief-{name}/") == []
    # the owner itself may not read the output bucket either: stored cancelable images are never inputs
    r = c.wait(c.submit(c.enroll_job("acme", "reuse", [done.image_uris[0]], "k1")), timeout=300)
    assert r.status == JobStatus.FAILED and r.error.code == "forbidden_input"
    v = c.wait(c.submit(c.verify_job("acme", "victim", f"s3://{dep.input_bucket}/tenants/beta/x.jpg")), timeout=300)
    assert v.status == JobStatus.FAILED and v.error.code == "forbidden_input"
