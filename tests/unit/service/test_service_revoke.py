"""Revocation on the fake runtime: the parent (``worker.service.revoke.revoke``: refusals before any change, chunking,
backpressure and time-budget hand-overs, re-delivery) and its chunks (``worker.service.reissue.reenroll``: new key
version, old versions revoked, per-subject failures, retryable faults, idempotent re-runs)."""

from __future__ import annotations

from typing import Any

import pytest
from service_fakes import INPUTS, FakeDispatch, FakeRuntime
from service_helpers import enroll_job, job, run_enroll

from worker.contracts import ChunkResult, JobStatus, ReenrollChunk, RevokeJob, RevokeResult
from worker.errors import NoTemplateError, RevokedKeyError, StorageError, UnknownKeyError
from worker.keys.providers import KeyRegistry
from worker.service import revoke as revoke_mod
from worker.service.clock import now
from worker.service.reissue import chunk_finished, reenroll
from worker.service.revoke import revoke
from worker.storage.templates import TemplateStore


def revoke_job(**kw: Any) -> RevokeJob:
    rj: RevokeJob = job(kind="revoke", tenant=kw.pop("tenant", "acme"), reason=kw.pop("reason", "compromised"), **kw)
    return rj


def run_revoke(rt: FakeRuntime, j: RevokeJob, dispatch: FakeDispatch, continuation: int = 0) -> RevokeResult:
    return revoke(rt, j, 1, now(), dispatch, continuation)


def run_chunk(rt: FakeRuntime, payload: dict[str, Any]) -> ChunkResult:
    return reenroll(rt, ReenrollChunk.model_validate(payload), 1, now())


def enrol_many(rt: FakeRuntime, subjects: list[str], key_id: str = "k1", tenant: str = "acme") -> None:
    for i, s in enumerate(subjects):
        assert run_enroll(rt, enroll_job(rt, s, person=i, key_id=key_id, tenant=tenant)).status == JobStatus.SUCCEEDED


# --- one subject ----------------------------------------------------------------------------------------------------
def test_subject_revocation_reissues_under_the_next_key_version_and_revokes_the_old(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    enrol_many(rt, ["ann"])
    j = revoke_job(subject="ann", purge_old_images=True)
    running = run_revoke(rt, j, dispatch)
    assert running.status == JobStatus.RUNNING and running.subjects_total == 1
    assert [c["subjects"] for c in dispatch.chunks] == [["ann"]]
    res = run_chunk(rt, dispatch.chunks[0])
    assert (res.status, res.succeeded, res.failed) == (JobStatus.SUCCEEDED, 1, 0)
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert final.status == JobStatus.SUCCEEDED
    assert (final.new_version, final.new_key_id, final.new_key_version, final.revoked_versions) == (2, "k1", 2, [1])
    ts = TemplateStore(rt.store)
    cur = ts.current("acme", "ann")
    assert (cur.version, cur.manifest.key_version) == (2, 2)
    assert ts.is_revoked("acme", "ann", 1)
    assert ts.get_manifest("acme", "ann", 2).source_images == ts.get_manifest("acme", "ann", 1).source_images
    assert [c.job_type for c in rt.engine_calls][-1] == "reenroll"
    old_images = [a.key for a in ts.get_manifest("acme", "ann", 1).images]
    new_images = [a.key for a in cur.manifest.images]
    assert old_images and not any(rt.store.exists(k) for k in old_images)  # purged once replaced
    assert all(rt.store.exists(k) for k in new_images)


def test_a_chunk_run_twice_bumps_the_key_once_and_commits_once(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    enrol_many(rt, ["ann"])
    run_revoke(rt, revoke_job(subject="ann"), dispatch)
    run_chunk(rt, dispatch.chunks[0])
    calls = len(rt.engine_calls)
    again = run_chunk(rt, dispatch.chunks[0])
    assert (again.succeeded, again.failed) == (1, 0)
    assert len(rt.engine_calls) == calls
    rec = KeyRegistry(rt.store).subject_key("acme", "ann")
    assert rec is not None and rec.key_version == 2
    assert TemplateStore(rt.store).list_versions("acme", "ann") == [1, 2]


def test_revoking_a_subject_without_a_template_changes_nothing(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    j = revoke_job(subject="nobody")
    with pytest.raises(NoTemplateError):
        run_revoke(rt, j, dispatch)
    assert dispatch.chunks == [] and not rt.book.exists(j.ref)


def test_a_retryable_fault_propagates_and_the_retry_finishes_the_subject(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    enrol_many(rt, ["ann"])
    run_revoke(rt, revoke_job(subject="ann"), dispatch)
    rt.engine_fault = StorageError("engine node unreachable")
    with pytest.raises(StorageError):
        run_chunk(rt, dispatch.chunks[0])
    rt.engine_fault = None
    res = run_chunk(rt, dispatch.chunks[0])
    assert (res.succeeded, res.failed) == (1, 0)
    rec = KeyRegistry(rt.store).subject_key("acme", "ann")
    assert rec is not None and rec.key_version == 2  # the retry found its own bump
    assert TemplateStore(rt.store).current("acme", "ann").manifest.key_version == 2


def test_a_subject_that_fails_alone_still_has_its_old_versions_revoked(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    enrol_many(rt, ["ann", "bob"])
    j = revoke_job(key_id="k1", new_key_id="k2")
    run_revoke(rt, j, dispatch)
    assert [c["subjects"] for c in dispatch.chunks] == [["ann", "bob"]]
    bob_source = TemplateStore(rt.store).current("acme", "bob").manifest.source_images[0].uri
    rt.s3.delete_object(Bucket=INPUTS, Key=bob_source.split("/", 3)[3])  # bob's photo is gone: not retryable
    res = run_chunk(rt, dispatch.chunks[0])
    assert (res.succeeded, res.failed) == (1, 1)
    ts = TemplateStore(rt.store)
    assert ts.current("acme", "ann").manifest.key_id == "k2"
    assert ts.is_revoked("acme", "bob", 1)  # the old key is compromised: revoked without a replacement
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert final.status == JobStatus.FAILED and final.error is not None
    assert final.error.code.value == "object_not_found"
    assert (final.subjects_done, final.subjects_failed) == (1, 1)


def test_a_chunk_that_failed_as_a_whole_counts_its_unfinished_subjects(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    enrol_many(rt, ["ann"])
    j = revoke_job(subject="ann")
    run_revoke(rt, j, dispatch)
    chunk = ReenrollChunk.model_validate(dispatch.chunks[0])
    failed = ChunkResult.model_validate(
        {
            "job_id": chunk.job_id,
            "tenant": "acme",
            "parent_job_id": j.job_id,
            "status": "dead_lettered",
            "error": {"code": "dead_lettered", "message": "x"},
            "attempts": 3,
        }
    )
    chunk_finished(rt, chunk, failed)
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert final.status == JobStatus.FAILED and final.subjects_failed == 1


# --- a whole key ----------------------------------------------------------------------------------------------------
def test_an_unknown_key_is_refused_and_nothing_is_written(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    j = revoke_job(key_id="nokey", new_key_id="k2")
    before = set(rt.s3.keys())
    with pytest.raises(UnknownKeyError):
        run_revoke(rt, j, dispatch)
    assert set(rt.s3.keys()) == before and not rt.book.exists(j.ref) and dispatch.chunks == []


def test_an_unknown_replacement_key_is_refused_before_any_change(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    enrol_many(rt, ["ann"])
    with pytest.raises(UnknownKeyError):
        run_revoke(rt, revoke_job(key_id="k1", new_key_id="nokey"), dispatch)
    assert not KeyRegistry(rt.store).is_revoked("acme", "k1")


def test_key_revocation_sends_chunks_and_reissues_every_subject_of_the_tenant_only(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    subjects = ["s1", "s2", "s3", "s4", "s5"]
    enrol_many(rt, subjects)
    enrol_many(rt, ["other"], key_id="k3")
    enrol_many(rt, ["s1"], tenant="beta")
    j = revoke_job(key_id="k1", new_key_id="k2")
    running = run_revoke(rt, j, dispatch)
    assert running.status == JobStatus.RUNNING
    assert [c["subjects"] for c in dispatch.chunks] == [["s1", "s2"], ["s3", "s4"], ["s5"]]  # revoke_chunk_size 2
    assert len({c["job_id"] for c in dispatch.chunks}) == 3
    for c in dispatch.chunks:
        run_chunk(rt, c)
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert (final.status, final.subjects_total, final.subjects_done) == (JobStatus.SUCCEEDED, 5, 5)
    ts = TemplateStore(rt.store)
    for s in subjects:
        assert ts.current("acme", s).manifest.key_id == "k2" and ts.is_revoked("acme", s, 1)
    assert ts.current("acme", "other").manifest.key_id == "k3"
    assert ts.current("beta", "s1").manifest.key_id == "k1" and not ts.is_revoked("beta", "s1", 1)
    with pytest.raises(RevokedKeyError):
        run_enroll(rt, enroll_job(rt, "new", key_id="k1"))


def test_a_redelivered_parent_re_sends_the_same_chunks(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    enrol_many(rt, ["s1", "s2", "s3"])
    j = revoke_job(key_id="k1", new_key_id="k2")
    run_revoke(rt, j, dispatch)
    again = FakeDispatch()
    run_revoke(rt, j, again)
    assert again.chunks == dispatch.chunks


def test_a_first_enrolment_in_flight_is_fenced_not_reissued(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    """A subject under the key with a key record but no committed version: fenced (counted), never chunked, and the
    enrolment derived under the revoked key can never commit a current version."""
    enrol_many(rt, ["ann"])
    KeyRegistry(rt.store).ensure_subject_key("acme", "pending", "k1")  # its first enrolment is still running
    j = revoke_job(key_id="k1", new_key_id="k2")
    run_revoke(rt, j, dispatch)
    assert [c["subjects"] for c in dispatch.chunks] == [["ann"]]
    run_chunk(rt, dispatch.chunks[0])
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert (final.subjects_total, final.subjects_fenced) == (1, 1)
    p = TemplateStore(rt.store).read_pointer("acme", "pending")
    assert p is not None and p[0].version is None and p[0].key_epoch == 2


def test_backpressure_pauses_the_listing_until_chunks_finish(
    rt: FakeRuntime, dispatch: FakeDispatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rt.settings.worker, "revoke_max_queued_chunks", 1)  # pause once more than 1 chunk (2) waits
    subjects = [f"s{i}" for i in range(1, 8)]
    enrol_many(rt, subjects)
    j = revoke_job(key_id="k1", new_key_id="k2")
    assert run_revoke(rt, j, dispatch).status == JobStatus.RUNNING
    assert [c["subjects"] for c in dispatch.chunks] == [["s1", "s2"], ["s3", "s4"]]
    assert dispatch.continued == [(1, revoke_mod.REVOKE_PAUSE_S)]
    run_revoke(rt, j, dispatch, continuation=1)  # still 4 unfinished: lists nothing, pauses again
    assert len(dispatch.chunks) == 2 and dispatch.continued[-1] == (2, revoke_mod.REVOKE_PAUSE_S)
    for c in dispatch.chunks:
        run_chunk(rt, c)
    run_revoke(rt, j, dispatch, continuation=2)
    assert [c["subjects"] for c in dispatch.chunks[2:4]] == [["s5", "s6"], ["s7"]]
    assert len(dispatch.continued) == 2  # the listing finished
    for c in dispatch.chunks[2:]:
        run_chunk(rt, c)
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert (final.status, final.subjects_total, final.subjects_done) == (JobStatus.SUCCEEDED, 7, 7)


def test_the_time_budget_hands_over_to_a_continuation_at_the_cursor(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    subjects = [f"s{i}" for i in range(1, 6)]
    enrol_many(rt, subjects)
    rt.settings.worker.fanout_time_budget = 0.0
    j = revoke_job(key_id="k1", new_key_id="k2")
    c = 0
    while True:
        before = len(dispatch.continued)
        run_revoke(rt, j, dispatch, continuation=c)
        if len(dispatch.continued) == before:
            break
        assert dispatch.continued[-1] == (c + 1, None)  # out of time: no pause
        c += 1
    assert c >= 1
    sent = [s for ch in dispatch.chunks for s in ch["subjects"]]
    assert sent == subjects  # each subject exactly once, in listing order, across hand-overs
    ids = [ch["job_id"] for ch in dispatch.chunks]
    assert len(set(ids)) == len(ids)


def test_a_subject_erased_while_reissued_counts_failed_under_a_placeholder(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    from worker.service.erase import placeholder
    from worker.storage.erasure import Erasures

    enrol_many(rt, ["ann", "bob"])
    j = revoke_job(key_id="k1", new_key_id="k2")
    run_revoke(rt, j, dispatch)
    rt.s3.put_once_before(
        lambda k: "/subjects/ann/versions/" in k, lambda: Erasures(rt.store).begin("acme", "ann", "er-1", "request")
    )
    res = run_chunk(rt, dispatch.chunks[0])
    assert (res.succeeded, res.failed) == (1, 1)
    assert TemplateStore(rt.store).list_versions("acme", "ann") == []  # its writes were deleted again
    failures = rt.book.failures(j.ref)
    assert failures == {placeholder("acme", "ann"): "erased"}  # the subject ID itself is not kept
    final = RevokeResult.model_validate(rt.book.get_result(j.ref))
    assert (final.subjects_done, final.subjects_failed) == (1, 1)
    assert TemplateStore(rt.store).current("acme", "bob").manifest.key_id == "k2"
