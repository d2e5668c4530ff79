"""Erasure against real processes (a worker with the random lite bundle, Redis, SeaweedFS): after ``cancelable erase``
no S3 object and no Redis key or value names the subject (every object and key listed and read), only an erasure
record keyed by a hash is left, verify answers ``no_template``; an enrolment racing the erasure is erased with it or
refused (``erased``), never left current; a tenant-wide erasure (continuing task after task) leaves other tenants
untouched; the retention sweep erases subjects past the retention; the fence itself, step by step, on real S3."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from worker_harness import REPO, Deployment, running

from producers.client import JobErased
from worker.contracts import ErrorCode, JobStatus

pytestmark = [pytest.mark.integration, pytest.mark.faults]

CLI = [sys.executable, "-m", "producers.cli"]


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _redis(dep: Deployment) -> Any:
    import redis

    return redis.Redis.from_url(dep.env["CANCELABLE_REDIS__URL"])


def _s3_mentions(dep: Deployment, needle: str) -> list[str]:
    """Every object of both buckets whose key or body contains ``needle``."""
    out = []
    for bucket in (dep.bucket, dep.input_bucket):
        for page in dep.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []) or []:
                body = dep.s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                if needle in o["Key"] or needle.encode() in body:
                    out.append(f"s3://{bucket}/{o['Key']}")
    return out


def _redis_mentions(r: Any, needle: str) -> list[str]:
    """Every Redis key whose name or value (string, hash, set, list, sorted set) contains ``needle``."""
    n, out = needle.encode(), []
    for k in r.scan_iter(count=1000):
        t = r.type(k)
        if t == b"string":
            vals = [r.get(k) or b""]
        elif t == b"hash":
            vals = [x for kv in r.hgetall(k).items() for x in kv]
        elif t == b"set":
            vals = list(r.smembers(k))
        elif t == b"list":
            vals = list(r.lrange(k, 0, -1))
        elif t == b"zset":
            vals = [m for m, _ in r.zrange(k, 0, -1, withscores=True)]
        else:
            vals = []
        if n in k or any(n in v for v in vals):
            out.append(k.decode())
    return out


def _eventually_none(dep: Deployment, needle: str, allowed: tuple[str, ...] = (), timeout: float = 15.0) -> None:
    """No mention left (the erase message itself sits in Redis until its ack, a moment after its result)."""
    r = _redis(dep)
    deadline = time.monotonic() + timeout
    while True:
        s3 = _s3_mentions(dep, needle)
        rk = [k for k in _redis_mentions(r, needle) if not any(a in k for a in allowed)]
        if not s3 and not rk:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still naming {needle}: S3 {s3}, Redis {rk}")
        time.sleep(0.5)


def _objects(dep: Deployment, prefix: str) -> dict[str, str]:
    out = {}
    for page in dep.s3.get_paginator("list_objects_v2").paginate(Bucket=dep.bucket, Prefix=prefix):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", []) or []})
    return out


def _record(dep: Deployment, tenant: str, subject: str | None) -> dict:
    from worker.storage.erasure import subject_digest

    name = "~tenant" if subject is None else subject_digest(tenant, subject)
    body = dep.s3.get_object(Bucket=dep.bucket, Key=f"tenants/{tenant}/erasures/{name}.json")["Body"].read()
    if subject is not None:
        assert subject.encode() not in body
    return json.loads(body)


def _local(dep: Deployment, tmp: Path, *names: str) -> list[str]:
    out = []
    for name in names:
        bucket, key = dep.faces[name][5:].split("/", 1)
        p = tmp / f"{name}.jpg"
        p.write_bytes(dep.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        out.append(str(p))
    return out


def _uid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(
        service_env,
        seaweed,
        tmp_path,
        concurrency=2,
        CANCELABLE_WORKER__FANOUT_TIME_BUDGET="0",  # a tenant-wide erasure continues after every subject
        CANCELABLE_WORKER__TEMPLATE_RETENTION_DAYS="30",
    )


def test_erase_subject_leaves_nothing_naming_it(dep: Deployment, tmp_path: Path) -> None:
    from worker.storage.deadletters import write_dead_letter
    from worker.storage.records import DeadLetter

    c, f, env = dep.client, dep.faces, dict(dep.env)
    subj, other = _uid("subj"), _uid("other")
    # enrolled from local photos through the CLI (uploaded to the input bucket), revoked (version 2, a revocation
    # record), verified, one failed verify; another subject of the tenant stays
    r = cli(["enroll", "--tenant", "acme", "--subject", subj, "--key", "k1", *_local(dep, tmp_path, "obama")], env)
    assert r.returncode == 0, (r.stdout, r.stderr, dep.worker.tail())
    rev = c.run(c.revoke_job("acme", "rotation", subject=subj), timeout=300)
    assert rev.status == JobStatus.SUCCEEDED and rev.new_version == 2, rev
    assert c.run(c.verify_job("acme", subj, f["obama2"]), timeout=180).status == JobStatus.SUCCEEDED
    bad = dep.upload_input("acme", "not-a-photo.jpg", b"not an image")
    assert c.run(c.verify_job("acme", subj, bad), timeout=180).status == JobStatus.FAILED
    assert c.run(c.enroll_job("acme", other, [f["biden"]], "k1"), timeout=180).status == JobStatus.SUCCEEDED
    # a dead letter naming the subject, in S3 and Redis (as the envelope writes one)
    dl_job = c.enroll_job("acme", subj, [f["obama3"]], "k1")
    rec = DeadLetter(job_id=dl_job.job_id, job_kind="enroll", tenant="acme", attempts=3, error_code="internal_error")
    rec = rec.model_copy(update={"job": json.loads(dl_job.model_dump_json())})
    uri = write_dead_letter(c.store, rec)
    c.book.add_dead_letter(dl_job.ref, {**rec.model_dump(mode="json"), "s3_uri": uri})
    uploads = [k for k in _objects_in(dep, dep.input_bucket, "tenants/acme/uploads/")]
    assert uploads
    other_before = _objects(dep, f"tenants/acme/subjects/{other}/")
    assert _s3_mentions(dep, subj) and _redis_mentions(_redis(dep), subj)  # there is something to erase

    r = cli(["erase", "--tenant", "acme", "--subject", subj, "--reason", "consent withdrawn"], env)
    assert r.returncode == 0, (r.stdout, r.stderr, dep.worker.tail())
    assert "erase" in r.stdout and "succeeded" in r.stdout and "record s3://" in r.stdout
    _eventually_none(dep, subj)
    folders = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix="tenants/acme/subjects/", Delimiter="/")
    assert [p["Prefix"] for p in folders.get("CommonPrefixes", [])] == [f"tenants/acme/subjects/{other}/"]
    assert _objects_in(dep, dep.input_bucket, "tenants/acme/uploads/") == []  # the CLI's upload of its photo
    rec_d = _record(dep, "acme", subj)
    assert rec_d["state"] == "done" and rec_d["scope"] == "subject" and rec_d["reason"] == "consent withdrawn"
    assert rec_d["finished_at"] and rec_d["job_id"] and rec_d["objects_deleted"] > 10
    # the other subject is untouched, verify of the erased one finds no template
    assert _objects(dep, f"tenants/acme/subjects/{other}/") == other_before
    v = c.run(c.verify_job("acme", subj, f["obama2"]), timeout=180)
    assert v.status == JobStatus.FAILED and v.error.code == ErrorCode.NO_TEMPLATE
    _eventually_none(dep, subj, allowed=(v.job_id,))  # the verify's own refusal names it, nothing else

    # again, and an unknown subject: idempotent, exit 0, says nothing was stored
    for s in (subj, _uid("never")):
        r = cli(["erase", "--tenant", "acme", "--subject", s, "--reason", "request", "--json"], env)
        assert r.returncode == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["status"] == "succeeded" and d["subjects_erased"] == 0 and d["objects_deleted"] == 0
        assert s not in r.stdout  # the result names the subject by its hash only
    # a new enrolment after the erasure (new consent) is allowed and starts again at version 1
    again = c.run(c.enroll_job("acme", subj, [f["obama"]], "k1"), timeout=180)
    assert again.status == JobStatus.SUCCEEDED and again.version == 1, again

    # CLI grammar: neither or both targets, a tenant-wide form without a matching confirmation -> exit 2
    for args in (
        ["erase", "--tenant", "acme", "--reason", "x"],
        ["erase", "--tenant", "acme", "--subject", subj, "--all-subjects", "--confirm", "acme", "--reason", "x"],
        ["erase", "--tenant", "acme", "--all-subjects", "--reason", "x"],
        ["erase", "--tenant", "acme", "--all-subjects", "--confirm", "acme2", "--reason", "x"],
        ["erase", "--tenant", "acme", "--subject", subj],
    ):
        r = cli(args, env)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "erase" in r.stderr


def _objects_in(dep: Deployment, bucket: str, prefix: str) -> list[str]:
    out: list[str] = []
    for page in dep.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", []) or []]
    return out


@pytest.mark.parametrize("delays", [(0.0, 0.4, 1.0, 2.0, 4.0)])
def test_enrolment_racing_an_erasure_is_erased_or_refused(dep: Deployment, delays: tuple[float, ...]) -> None:
    """Two worker processes: the enrolment and the erasure run at the same time, the erasure queued after the
    enrolment by each delay. Whatever the interleaving, nothing of the subject stays and the enrolment either
    succeeded (then the erasure erased it) or failed ``erased``."""
    c, f = dep.client, dep.faces
    outcomes = []
    for d in delays:
        subj = _uid("race")
        enrol = c.enroll_job("acme", subj, [f["obama"], f["obama2"]], "k1")
        ref = c.submit(enrol)
        time.sleep(d)
        erase = c.erase_job("acme", "consent withdrawn", subject=subj)
        eref = c.submit(erase)
        er = c.wait(eref, timeout=300)
        assert er.status == JobStatus.SUCCEEDED, er
        try:
            res = c.wait(ref, timeout=300)
        except JobErased:  # it committed before the erasure, which then deleted it, its result included
            res = None
            assert c.status(ref)["state"] == "erased"
        assert res is None or (res.status == JobStatus.FAILED and res.error.code == ErrorCode.ERASED), res
        outcomes.append("erased after it succeeded" if res is None else "refused: erased")
        v = c.run(c.verify_job("acme", subj, f["obama3"]), timeout=180)
        assert v.status == JobStatus.FAILED and v.error.code == ErrorCode.NO_TEMPLATE, (d, res, v)
        # only the refusals' own results may still name the subject (the answer to their producer)
        allowed = (v.job_id,) + (() if res is None else (enrol.job_id,))
        _eventually_none(dep, subj, allowed=allowed)
    print("enrolment outcomes by delay:", dict(zip(delays, outcomes, strict=True)))


def test_tenant_erase_leaves_other_tenants_untouched_and_retention(dep: Deployment) -> None:
    c, f = dep.client, dep.faces
    ta, tb = _uid("ta"), _uid("tb")
    refs = {}
    for t in (ta, tb):
        for name in ("obama", "biden"):
            body = dep.s3.get_object(Bucket=dep.input_bucket, Key=f["obama"][5:].split("/", 1)[1])["Body"].read()
            refs[(t, name)] = dep.upload_input(t, f"uploads/{name}-{uuid.uuid4().hex}.jpg", body)
    subjects = {t: [_uid("s"), _uid("s"), _uid("s")] for t in (ta, tb)}
    for t, subs in subjects.items():
        for i, s in enumerate(subs):
            res = c.run(c.enroll_job(t, s, [refs[(t, ("obama", "biden")[i % 2])]], "k1"), timeout=180)
            assert res.status == JobStatus.SUCCEEDED, res
    b_objects = _objects(dep, f"tenants/{tb}/")
    b_uploads = _objects_in(dep, dep.input_bucket, f"tenants/{tb}/")
    r = _redis(dep)
    b_keys = sorted(k.decode() for k in r.scan_iter(match=f"*{tb}*"))
    assert b_objects and b_uploads and b_keys

    er = c.run(c.erase_job(ta, "tenant left", all_subjects=True, confirm=ta), timeout=300)
    assert er.status == JobStatus.SUCCEEDED, er
    assert er.all_subjects and er.subjects_erased == 3 and er.objects_deleted > 3 * 5
    assert _objects(dep, f"tenants/{ta}/subjects/") == {}
    assert _objects_in(dep, dep.input_bucket, f"tenants/{ta}/uploads/") == []
    for s in subjects[ta]:
        _eventually_none(dep, s)
    rec = _record(dep, ta, None)
    assert rec["state"] == "done" and rec["scope"] == "tenant" and rec["job_id"] == er.job_id
    # tenant b: every object, upload and Redis key as before
    assert _objects(dep, f"tenants/{tb}/") == b_objects
    assert _objects_in(dep, dep.input_bucket, f"tenants/{tb}/") == b_uploads
    assert sorted(k.decode() for k in r.scan_iter(match=f"*{tb}*")) == b_keys
    # the continuation ran: one attempt key per continuation (fanout budget 0: one subject per task)
    assert r.exists(f"cf:attempts:{ta}/{er.job_id}-c2"), "the erasure did not continue task after task"
    # a new enrolment in the erased tenant is allowed afterwards
    s_new = _uid("s")
    photo = dep.upload_input(ta, "new-consent.jpg", body)  # the tenant's uploads were erased with it
    assert c.run(c.enroll_job(ta, s_new, [photo], "k1"), timeout=180).status == JobStatus.SUCCEEDED

    # retention: 30 days; swept as of 31 days from now, every subject of b is erased
    from datetime import UTC, datetime, timedelta

    at = (datetime.now(UTC) + timedelta(days=31)).isoformat()
    out = c.app.send_task("cancelable.sweep_retention", kwargs={"at": at}, queue="control").get(timeout=300)
    assert out["erased"] >= 3, out
    for s in subjects[tb]:
        v = c.run(c.verify_job(tb, s, refs[(tb, "obama")]), timeout=180)
        assert v.status == JobStatus.FAILED and v.error.code == ErrorCode.NO_TEMPLATE
        assert _record(dep, tb, s)["job_id"].startswith("retention-")
        _eventually_none(dep, s, allowed=(v.job_id,))
    # as of now, nothing is past the retention: a fresh subject stays
    assert _objects_in(dep, dep.input_bucket, f"tenants/{tb}/uploads/") == []  # their uploaded photos too
    s_keep = _uid("s")
    photo = dep.upload_input(tb, "uploads/new-consent.jpg", body)
    assert c.run(c.enroll_job(tb, s_keep, [photo], "k1"), timeout=180).status == JobStatus.SUCCEEDED
    out = c.app.send_task("cancelable.sweep_retention", queue="control").get(timeout=300)
    assert out["erased"] == 0, out
    assert c.run(c.verify_job(tb, s_keep, photo), timeout=180).status == JobStatus.SUCCEEDED


def test_fence_step_by_step_on_real_s3(make_settings, seaweed) -> None:
    """The interleavings a worker cannot be made to hit on cue, on real SeaweedFS: an erasure that ran between an
    enrolment's start and its commit makes the enrolment delete what it wrote and fail ``erased``; an erasure in
    progress refuses an enrolment; one begun after a job was queued refuses it; a new enrolment after a finished
    erasure is allowed."""
    from worker.broker.config import connect_store
    from worker.errors import ErasedError
    from worker.storage.erasure import Erasures, delete_subject_objects, watch
    from worker.storage.records import TemplateRecord, encode_embedding
    from worker.storage.templates import TemplateStore

    store = connect_store(make_settings(bucket=seaweed.new_bucket("e")))
    ts, er = TemplateStore(store), Erasures(store)

    def commit(job: str) -> None:
        rec = TemplateRecord(
            tenant="acme",
            subject="s1",
            job_id=job,
            key_id="k1",
            key_version=1,
            bundle_id="b",
            embedding_dim=4,
            embedding=encode_embedding(np.ones(4)),
            source_images=[],
        )
        ts.commit_version("acme", "s1", job, template=rec, images=[b"png"], key_epoch=1)

    fence = watch(store, "acme", "s1")
    er.begin("acme", "s1", "erase-job-0001", "r")
    delete_subject_objects(store, "acme", "s1")
    er.finish("acme", "s1", "erase-job-0001", 0)
    commit("enrol-job-0001")  # lands after the erasure's listing
    assert list(store.list("tenants/acme/subjects/s1/"))
    with pytest.raises(ErasedError):
        fence.check()
    assert list(store.list("tenants/acme/subjects/s1/")) == []
    assert list(store.list_dirs("tenants/acme/subjects/")) == []  # no empty folder named by the subject either

    fence = watch(store, "acme", "s1")  # a new enrolment after the erasure finished
    commit("enrol-job-0002")
    fence.check()
    assert ts.current("acme", "s1").version == 1

    queued = time.time()
    time.sleep(0.05)
    er.begin("acme", "s1", "erase-job-0002", "r")
    with pytest.raises(ErasedError, match="in progress"):
        watch(store, "acme", "s1")
    er.finish("acme", "s1", "erase-job-0002", 0)
    with pytest.raises(ErasedError, match="after this job was queued"):
        watch(store, "acme", "s1", queued_at=queued)
    watch(store, "acme", "s1", queued_at=time.time())  # queued after it: a new enrolment
