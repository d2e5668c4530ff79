"""Fault scenarios of revocation and tenancy against real Redis, SeaweedFS and worker processes (docs/reliability.md).

- an enrolment in flight while its subject is revoked can never become current under the revoked key version;
- a whole-key revocation racing a subject's first enrolment leaves nothing current under the revoked key;
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
RACE_STEPS = "60"  # the in-flight first enrolment of the key-revocation race (its timings are spread over it)


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    # the in-flight enrolments here run hundreds of steps, twice when fenced: time limits a loaded 2-core machine
    # cannot break (the visibility timeout stays above them for every worker on this Redis)
    yield from running(
        service_env,
        seaweed,
        tmp_path,
        CANCELABLE_WORKER__TASK_TIME_LIMIT="600",
        CANCELABLE_WORKER__VISIBILITY_TIMEOUT="700",
    )


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
            c.app.send_task(TASK_ENROLL, args=[to_wire(job)], task_id=job.ref, queue="slow", ignore_result=True)
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


# --- a whole-key revocation racing a subject's FIRST enrolment --------------------------------------------------------
def _committed_version(pointer: dict | None) -> int | None:
    return None if pointer is None else pointer.get("version")


def _assert_nothing_current_under(dep: Deployment, tenant: str, key_id: str) -> None:
    """Every subject of ``tenant``: its current version (if any) is not under ``key_id``, and every version made
    under ``key_id`` is marked revoked."""
    base = f"tenants/{tenant}/subjects/"
    for subject in {k[len(base) :].split("/", 1)[0] for k in _keys(dep, base)}:
        pointer = _json(dep, f"{base}{subject}/current.json")
        manifests = {int(k.rsplit("/", 1)[1][:10]): _json(dep, k) for k in _keys(dep, f"{base}{subject}/versions/")}
        revoked = {int(k.rsplit("/", 1)[1][:10]) for k in _keys(dep, f"{base}{subject}/revocations/")}
        v = _committed_version(pointer)
        if v is not None:
            assert manifests[v]["key_id"] != key_id, f"{tenant}/{subject}: version {v} current under revoked {key_id}"
        for n, m in manifests.items():
            if m["key_id"] == key_id:
                assert n in revoked, f"{tenant}/{subject}: version {n} under revoked {key_id} is not marked revoked"


@pytest.mark.parametrize("mode", ["index", "scan"])
def test_key_revoke_racing_a_first_enrolment_leaves_nothing_current_under_the_key(
    dep: Deployment, tmp_path: Path, mode: str
) -> None:
    """A new subject's first enrolment under k1 runs (on a slow worker) while k1 is revoked onto k2, at RUNS
    timings from "right as the enrolment starts" to "right after it committed", with the key's subject index
    complete (``index``) or absent (``scan``). Each run on its own tenant, which also has one subject committed
    under k1 beforehand. Exact end state: either the enrolment committed first and the revocation reissued it
    (2 of 2 subjects, its version 1 revoked, version 2 under k2 current), or the enrolment failed ``revoked_key`` and
    nothing of it is current (the revocation counted it as fenced when it had written its key record; 1 of 1
    reissued); no subject is current under k1; the subject then enrols under k2."""
    from worker.broker.config import TASK_ENROLL
    from worker.storage.keyindex import KeyIndex

    c = dep.client
    faces = {
        n: dep.s3.get_object(Bucket=dep.input_bucket, Key=f"tenants/acme/{n}.jpg")["Body"].read()
        for n in ("obama", "obama2")
    }
    slow = start_worker(
        {**dep.env, "CANCELABLE_ENGINE__STEPS": RACE_STEPS}, tmp_path / "slow.log", queues="slow", name="slow"
    )

    def first_enrolment(tenant: str, tag: str) -> tuple[str, str]:
        face = dep.upload_input(tenant, "b.jpg", faces["obama2"])
        job = c.enroll_job(tenant, "first", [face], "k1", job_id=job_id(tag))
        c.app.send_task(TASK_ENROLL, args=[to_wire(job)], task_id=job.ref, queue="slow", ignore_result=True)
        deadline = time.monotonic() + 120
        while c.book.attempts(job.ref) < 1:  # the slow worker picked it up
            assert time.monotonic() < deadline, slow.tail()
            time.sleep(0.02)
        return job.ref, face

    outcomes: list[str] = []
    try:
        wait_ready(c, dep.worker)
        # how long a first enrolment takes on the slow worker, from pick-up to result (after a warm-up one)
        for tag in ("warm", "calib"):
            calib, _ = first_enrolment(f"{tag}-{mode}", tag)
            t0 = time.monotonic()
            assert c.wait(calib, timeout=300).status == JobStatus.SUCCEEDED, slow.tail()
            took = time.monotonic() - t0
        for run in range(RUNS):
            tenant = f"race-{mode}-{run}"
            if mode == "index":
                KeyIndex(c.store).mark_complete(tenant, None)
            old_face = dep.upload_input(tenant, "a.jpg", faces["obama"])
            old = c.wait(c.submit(c.enroll_job(tenant, "old", [old_face], "k1")), timeout=300)
            assert old.status == JobStatus.SUCCEEDED, old
            enrol_id, face = first_enrolment(tenant, f"first{run}")
            if run == RUNS - 1:
                assert c.wait(enrol_id, timeout=300).status == JobStatus.SUCCEEDED  # right after it committed
            else:
                time.sleep(took * run / max(RUNS - 1, 1))  # 0 .. ~the whole enrolment
            rv = c.wait(c.submit(c.revoke_job(tenant, "race", key_id="k1", new_key_id="k2")), timeout=300)
            en = c.wait(enrol_id, timeout=300)
            assert rv.status == JobStatus.SUCCEEDED and rv.subjects_failed == 0, (run, rv)

            base = f"tenants/{tenant}/subjects/first/"
            pointer, key = _json(dep, base + "current.json"), _json(dep, base + "key.json")
            revoked = {int(k.rsplit("/", 1)[1][:10]) for k in _keys(dep, base + "revocations/")}
            if en.status == JobStatus.SUCCEEDED:  # committed before the fence: reissued like any subject
                outcomes.append("reissued")
                assert (rv.subjects_total, rv.subjects_done, rv.subjects_fenced) == (2, 2, 0), (run, rv)
                assert (en.version, en.key_id) == (1, "k1"), (run, en)
                assert pointer["version"] == 2 and key["key_id"] == "k2" and revoked == {1}, (run, pointer, key)
            else:
                assert en.error is not None and en.error.code == "revoked_key", (run, en, slow.tail())
                assert (rv.subjects_total, rv.subjects_done) == (1, 1), (run, rv)
                assert _committed_version(pointer) is None, (run, pointer)
                if rv.subjects_fenced:  # listed with its key record and no version: moved to k2, fenced
                    outcomes.append("fenced")
                    assert rv.subjects_fenced == 1 and key["key_id"] == "k2", (run, rv, key)
                    assert pointer["key_epoch"] == 2 and pointer["job_id"] == rv.job_id, (run, pointer)
                else:  # its key record came after the listing: the key check refused it
                    outcomes.append("refused")
            _assert_nothing_current_under(dep, tenant, "k1")
            old_ptr = _json(dep, f"tenants/{tenant}/subjects/old/current.json")
            assert old_ptr is not None and old_ptr["version"] == 2, (run, old_ptr)
            # the caller retries: under k1 refused, under k2 it enrols (a fenced subject is not stuck)
            if en.status != JobStatus.SUCCEEDED:
                again = c.wait(c.submit(c.enroll_job(tenant, "first", [face], "k2")), timeout=300)
                assert again.status == JobStatus.SUCCEEDED and again.key_id == "k2", (run, again, dep.worker.tail())
                assert _json(dep, base + "current.json")["version"] == again.version
                _assert_nothing_current_under(dep, tenant, "k1")
        pointer_fenced = slow.log.read_text().count("enrol fenced off by a revocation")
    finally:
        slow.stop()
    print(f"{mode}: {', '.join(outcomes)}; commits refused by the pointer fence: {pointer_fenced}")
    # the race really happened both ways, and the pointer fence (not only the key check) refused a commit
    assert "reissued" in outcomes and "fenced" in outcomes, outcomes
    assert pointer_fenced >= 1, (outcomes, "no run had its commit refused by the fence; raise RACE_STEPS")


# --- a revocation naming a key that does not exist ------------------------------------------------------------------
def _snapshot(dep: Deployment) -> dict[str, str]:
    """Every object of both buckets -> its ETag."""
    out: dict[str, str] = {}
    for bucket in (dep.bucket, dep.input_bucket):
        for page in dep.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out.update({f"{bucket}/{o['Key']}": o["ETag"] for o in page.get("Contents", [])})
    return out


def test_revoking_an_unknown_key_is_bad_input_and_writes_nothing(dep: Deployment) -> None:
    """``cancelable revoke --key`` with an unknown key ID (revoked or replacement): exit 2 with the error code, the
    job result ``unknown_key``, not one object written or changed in either bucket; the name stays unknown (a later
    enrolment under it says ``unknown_key``, not ``revoked_key``). A key removed from the keyring that the tenant
    still has subjects under can still be revoked (retiring key material before moving its subjects)."""
    import subprocess
    import sys

    from worker_harness import REPO

    c = dep.client
    r = c.wait(c.submit(c.enroll_job("acme", "kept", [dep.faces["obama"]], "k1")), timeout=300)
    assert r.status == JobStatus.SUCCEEDED, r
    before = _snapshot(dep)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "producers.cli", "revoke", "--tenant", "acme", "--reason", "r", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=dep.env, timeout=300, cwd=REPO)

    for args in (["--key", "no-such-key", "--new-key", "k2"], ["--key", "k1", "--new-key", "no-such-key"]):
        p = cli(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert "unknown_key" in p.stdout and "no-such-key" in p.stdout, (args, p.stdout)
    rv = c.wait(c.submit(c.revoke_job("acme", "r", key_id="no-such-key", new_key_id="k2")), timeout=300)
    assert rv.status == JobStatus.FAILED and rv.error is not None and rv.error.code == "unknown_key", rv
    assert rv.subjects_total == 0
    assert _snapshot(dep) == before, "a refused revocation wrote to S3"
    en = c.wait(c.submit(c.enroll_job("acme", "later", [dep.faces["obama2"]], "no-such-key")), timeout=300)
    assert en.status == JobStatus.FAILED and en.error is not None and en.error.code == "unknown_key", en

    # k1 retired from the keyring while acme still has a subject under it: the revocation is accepted
    ring = json.loads(dep.keyring.read_text())
    del ring["keys"]["k1"]
    dep.keyring.write_text(json.dumps(ring))
    p = cli("--key", "k1", "--new-key", "k2")
    assert p.returncode == 0, (p.stdout, p.stderr, dep.worker.tail())
    assert "subjects 1/1 reissued" in p.stdout, p.stdout
