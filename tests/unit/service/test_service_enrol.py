"""``worker.service.enrol.enroll`` on the fake runtime: versions, idempotency, key refusals before any download or
write, the revocation fence loop, and the erasure fence."""

from __future__ import annotations

import pytest
from service_fakes import BUCKET, INPUTS, FakeRuntime
from service_helpers import enroll_job, read_json, run_enroll, subject_keys

from worker.contracts import JobStatus
from worker.errors import (
    ErasedError,
    ForbiddenInputError,
    KeyError_,
    ObjectNotFoundError,
    RevokedKeyError,
    StaleKeyError,
    UnknownKeyError,
)
from worker.keys.providers import KeyRegistry
from worker.storage.erasure import Erasures
from worker.storage.templates import TemplateStore


def _puts(rt: FakeRuntime, bucket: str = BUCKET) -> list[str]:
    return [k for op, b, k in rt.s3.calls if op == "put" and b == bucket]


def _gets(rt: FakeRuntime, bucket: str = INPUTS) -> list[str]:
    return [k for op, b, k in rt.s3.calls if op == "get" and b == bucket]


def _revoke_subject(rt: FakeRuntime, tenant: str, subject: str, job_id: str) -> None:
    """What a revocation chunk does first: bump the subject's key version and raise the fence to its epoch."""
    rec = KeyRegistry(rt.store).bump_subject_key(tenant, subject, reason="test", job_id=job_id)
    TemplateStore(rt.store).raise_fence(tenant, subject, rec.epoch)


def test_enrol_commits_version_one_under_key_version_one(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann", captures=2)
    res = run_enroll(rt, job)
    assert res.status == JobStatus.SUCCEEDED
    assert (res.version, res.created, res.key_id, res.key_version) == (1, True, "k1", 1)
    assert len(res.image_uris) == 2
    pointer = read_json(rt, "tenants/acme/subjects/ann/current.json")
    assert (pointer["version"], pointer["job_id"]) == (1, job.job_id)
    manifest = read_json(rt, "tenants/acme/subjects/ann/versions/0000000001.json")
    assert (manifest["key_id"], manifest["key_version"], manifest["key_epoch"]) == ("k1", 1, 1)
    assert [c.job_type for c in rt.engine_calls] == ["enroll"] and rt.engine_calls[0].images == 2


def test_same_job_twice_is_one_version_and_one_engine_run(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann")
    first = run_enroll(rt, job)
    again = run_enroll(rt, job)
    assert (again.version, again.created) == (first.version, False)
    assert again.manifest_uri == first.manifest_uri
    assert len(rt.engine_calls) == 1
    assert TemplateStore(rt.store).list_versions("acme", "ann") == [1]


def test_next_job_of_the_subject_commits_the_next_version(rt: FakeRuntime) -> None:
    run_enroll(rt, enroll_job(rt, "ann"))
    res = run_enroll(rt, enroll_job(rt, "ann", person=0))
    assert (res.version, res.key_version) == (2, 1)
    assert TemplateStore(rt.store).current("acme", "ann").version == 2


def test_unknown_key_fails_before_any_download_or_write(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann", key_id="nokey")
    rt.s3.calls.clear()
    with pytest.raises(UnknownKeyError):
        run_enroll(rt, job)
    assert _gets(rt) == [] and _puts(rt) == [] and rt.engine_calls == []


def test_key_revoked_for_the_tenant_is_refused_and_other_tenants_keep_it(rt: FakeRuntime) -> None:
    KeyRegistry(rt.store).revoke_key("acme", "k1", reason="leak", job_id="rv-1")
    job = enroll_job(rt, "ann")
    rt.s3.calls.clear()
    with pytest.raises(RevokedKeyError):
        run_enroll(rt, job)
    assert _gets(rt) == [] and subject_keys(rt, "acme", "ann") == []
    assert run_enroll(rt, enroll_job(rt, "ann", tenant="beta")).status == JobStatus.SUCCEEDED


def test_a_subject_under_another_key_is_refused(rt: FakeRuntime) -> None:
    run_enroll(rt, enroll_job(rt, "ann", key_id="k1"))
    with pytest.raises(KeyError_) as e:
        run_enroll(rt, enroll_job(rt, "ann", key_id="k2"))
    assert type(e.value) is KeyError_ and "another key" in str(e.value)
    assert TemplateStore(rt.store).list_versions("acme", "ann") == [1]


def test_an_image_of_another_tenant_is_refused_before_any_s3_request(rt: FakeRuntime) -> None:
    other = enroll_job(rt, "ann", tenant="beta")
    job = enroll_job(rt, "ann")
    job = job.model_copy(update={"images": other.images})
    rt.s3.calls.clear()
    with pytest.raises(ForbiddenInputError):
        run_enroll(rt, job)
    assert rt.s3.calls == [] or all(op != "get" or b != INPUTS for op, b, _ in rt.s3.calls)
    assert _puts(rt) == []


def test_a_missing_image_fails_with_its_uri_and_writes_no_version(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann")
    key = job.images[0].key
    rt.s3.delete_object(Bucket=INPUTS, Key=key)
    with pytest.raises(ObjectNotFoundError) as e:
        run_enroll(rt, job)
    assert key in str(e.value)
    assert subject_keys(rt, "acme", "ann", "versions/") == []


def test_a_revocation_between_engine_run_and_commit_is_fenced_and_re_derived(rt: FakeRuntime) -> None:
    """The revocation bumps the key version and raises the fence just before the enrolment writes its manifest: the
    commit derived under key version 1 is marked revoked, and the job re-derives under version 2 (the images are
    downloaded once)."""
    run_enroll(rt, enroll_job(rt, "ann"))
    job = enroll_job(rt, "ann")
    rt.engine_calls.clear()
    rt.s3.calls.clear()
    rt.s3.put_once_before(lambda k: "/subjects/ann/versions/" in k, lambda: _revoke_subject(rt, "acme", "ann", "rv-1"))
    res = run_enroll(rt, job)
    assert (res.version, res.key_version) == (3, 2)
    ts = TemplateStore(rt.store)
    assert ts.current("acme", "ann").version == 3
    fenced = ts.revocation("acme", "ann", 2)
    assert fenced is not None and fenced.job_id == job.job_id  # version 2 (key version 1) never became current
    assert len(rt.engine_calls) == 2 and len(_gets(rt)) == 1


def test_a_concurrent_commit_of_another_job_takes_the_slot_and_ours_commits_the_next(rt: FakeRuntime) -> None:
    mine, theirs = enroll_job(rt, "ann"), enroll_job(rt, "ann")
    other: list[int] = []
    rt.s3.put_once_before(
        lambda k: "/subjects/ann/versions/" in k, lambda: other.append(run_enroll(rt, theirs).version)
    )
    res = run_enroll(rt, mine)
    assert other == [1] and (res.version, res.created) == (2, True)
    ts = TemplateStore(rt.store)
    assert ts.list_versions("acme", "ann") == [1, 2] and ts.current("acme", "ann").version == 2
    assert ts.get_manifest("acme", "ann", 1).job_id == theirs.job_id


def test_a_twin_delivery_committing_first_leaves_one_version_and_no_orphans(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann")
    twin: list[int] = []
    rt.s3.put_once_before(lambda k: "/subjects/ann/versions/" in k, lambda: twin.append(run_enroll(rt, job).version))
    res = run_enroll(rt, job)
    assert twin == [1] and (res.version, res.created) == (1, False)
    ts = TemplateStore(rt.store)
    assert ts.list_versions("acme", "ann") == [1]
    m = ts.get_manifest("acme", "ann", 1)
    kept = {a.key for a in m.images} | {m.template.key}
    assert set(subject_keys(rt, "acme", "ann", "staging/")) == kept  # the loser's artefacts were deleted


def test_fence_loop_gives_up_after_its_retries(rt: FakeRuntime) -> None:
    from worker.service.enrol import FENCE_RETRIES

    run_enroll(rt, enroll_job(rt, "ann"))
    job = enroll_job(rt, "ann")
    n = iter(range(100))

    def revoke_each_time(bucket: str, key: str) -> None:
        if "/subjects/ann/versions/" in key:
            _revoke_subject(rt, "acme", "ann", f"rv-{next(n)}")

    rt.s3.before_put.append(revoke_each_time)
    rt.engine_calls.clear()
    with pytest.raises(StaleKeyError) as e:
        run_enroll(rt, job)
    assert f"revoked {FENCE_RETRIES} times" in str(e.value)
    assert len(rt.engine_calls) == FENCE_RETRIES
    ts = TemplateStore(rt.store)
    assert ts.current("acme", "ann").version == 1
    assert all(ts.is_revoked("acme", "ann", v) for v in ts.list_versions("acme", "ann") if v != 1)


def test_an_erasure_in_progress_refuses_the_enrolment(rt: FakeRuntime) -> None:
    Erasures(rt.store).begin("acme", "ann", "er-1", "gdpr")
    with pytest.raises(ErasedError):
        run_enroll(rt, enroll_job(rt, "ann"))
    assert subject_keys(rt, "acme", "ann") == [] and rt.engine_calls == []


def test_an_erasure_after_the_job_was_queued_refuses_it_and_a_new_job_may_enrol(rt: FakeRuntime) -> None:
    import time

    queued = time.time() - 60
    er = Erasures(rt.store)
    er.begin("acme", "ann", "er-1", "gdpr")
    er.finish("acme", "ann", "er-1", 0)
    with pytest.raises(ErasedError):
        run_enroll(rt, enroll_job(rt, "ann"), queued_at=queued)
    res = run_enroll(rt, enroll_job(rt, "ann"), queued_at=time.time() + 1)
    assert res.status == JobStatus.SUCCEEDED


def test_an_erasure_that_begins_while_the_job_runs_deletes_its_writes(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann")
    rt.s3.put_once_before(
        lambda k: "/subjects/ann/versions/" in k, lambda: Erasures(rt.store).begin("acme", "ann", "er-1", "gdpr")
    )
    with pytest.raises(ErasedError):
        run_enroll(rt, job)
    assert subject_keys(rt, "acme", "ann", "versions/") == []
    assert subject_keys(rt, "acme", "ann", "current.json") == []


def test_a_job_whose_records_were_erased_is_not_run_again(rt: FakeRuntime) -> None:
    job = enroll_job(rt, "ann")
    rt.book.forget_job(job.ref)
    with pytest.raises(ErasedError):
        run_enroll(rt, job)
    assert rt.engine_calls == [] and subject_keys(rt, "acme", "ann") == []
