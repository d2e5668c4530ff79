"""``worker.service.erase`` on the fake runtime: erasing a subject leaves nothing naming it (S3 objects, job-book
records; a re-delivered job of it is refused), a revocation's progress keeps its counts with a placeholder, a
tenant-wide erasure hands over at its cursor and spares other tenants, the retention sweep, and an enrolment
overtaken by an erasure after its commit."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from service_fakes import FakeDispatch, FakeRuntime
from service_helpers import enroll_job, job, run_enroll, subject_keys

from worker.contracts import EraseJob, EraseResult, JobStatus, ReenrollChunk, to_wire
from worker.errors import ErasedError
from worker.service.clock import now
from worker.service.enrol import forget_if_erased
from worker.service.erase import erase, placeholder, sweep_retention
from worker.service.reissue import reenroll
from worker.service.revoke import revoke
from worker.storage.erasure import Erasures, subject_digest


def erase_job(**kw: Any) -> EraseJob:
    ej: EraseJob = job(kind="erase", tenant=kw.pop("tenant", "acme"), reason="request", **kw)
    return ej


def run_erase(rt: FakeRuntime, j: EraseJob, dispatch: FakeDispatch, continuation: int = 0) -> EraseResult:
    return erase(rt, j, 1, now(), dispatch, continuation)


def _redis_mentions(rt: FakeRuntime, text: str) -> list[str]:
    """Redis keys whose name or value contains ``text``."""
    b = text.encode()
    out = []
    for k, v in rt.redis.data.items():
        blobs = [v] if isinstance(v, bytes) else list(v.items()) if isinstance(v, dict) else list(v)
        flat = b"".join(x if isinstance(x, bytes) else b"".join(x) for x in blobs)
        if text in k or b in flat:
            out.append(k)
    return out


def test_erasing_a_subject_leaves_nothing_naming_it(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    ann = enroll_job(rt, "ann-x", person=0)
    res = run_enroll(rt, ann)
    rt.book.save_result(ann.ref, to_wire(res))
    run_enroll(rt, enroll_job(rt, "bob", person=1))
    j = erase_job(subject="ann-x")
    out = run_erase(rt, j, dispatch)
    assert out.status == JobStatus.SUCCEEDED and out.subjects_erased == 1 and out.objects_deleted > 0
    assert out.subject_sha256 == subject_digest("acme", "ann-x")
    assert subject_keys(rt, "acme", "ann-x") == []
    assert [k for k in rt.s3.keys() if "ann-x" in k] == []
    assert _redis_mentions(rt, "ann-x") == [] and rt.book.get_result(ann.ref) is None
    assert rt.book.was_erased(ann.ref)
    with pytest.raises(ErasedError):  # its message delivered again: refused, nothing written
        run_enroll(rt, ann)
    assert subject_keys(rt, "acme", "bob", "current.json")
    rec = Erasures(rt.store).read("acme", "ann-x")
    assert rec is not None and rec[0].state == "done"
    assert run_enroll(rt, enroll_job(rt, "ann-x")).version == 1  # a new enrolment after the erasure is allowed


def test_an_erased_subject_leaves_a_placeholder_in_a_revocation_progress(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    for i, s in enumerate(["ann", "bob"]):
        run_enroll(rt, enroll_job(rt, s, person=i))
    rv = job(kind="revoke", tenant="acme", reason="leak", key_id="k1", new_key_id="k2")
    revoke(rt, rv, 1, now(), dispatch, 0)
    reenroll(rt, ReenrollChunk.model_validate(dispatch.chunks[0]), 1, now())
    run_erase(rt, erase_job(subject="ann"), FakeDispatch())
    p = rt.book.progress(rv.ref)
    assert (p.total, p.succeeded, p.failed) == (2, 2, 0)
    assert rt.book.is_item_done(rv.ref, placeholder("acme", "ann")) and not rt.book.is_item_done(rv.ref, "ann")
    assert rt.book.is_item_done(rv.ref, "bob")


def test_a_tenant_erasure_hands_over_at_its_cursor_and_spares_other_tenants(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    for i, s in enumerate(["s1", "s2", "s3"]):
        run_enroll(rt, enroll_job(rt, s, person=i))
    run_enroll(rt, enroll_job(rt, "s1", tenant="beta"))
    rt.settings.worker.fanout_time_budget = 0.0
    j = erase_job(all_subjects=True, confirm="acme")
    results = []
    for c in range(10):
        before = len(dispatch.continued)
        results.append(run_erase(rt, j, dispatch, c))
        if len(dispatch.continued) == before:
            break
    assert [r.status for r in results[:-1]] == [JobStatus.RUNNING] * (len(results) - 1) and len(results) >= 3
    final = results[-1]
    assert (final.status, final.subjects_erased, final.all_subjects) == (JobStatus.SUCCEEDED, 3, True)
    assert [k for k in rt.s3.keys(prefix="tenants/acme/subjects/")] == []
    assert subject_keys(rt, "beta", "s1", "current.json")
    with pytest.raises(ErasedError):  # the tenant's record fences enrolments queued before it
        run_enroll(rt, enroll_job(rt, "s4"), queued_at=now().timestamp() - 60)


def test_retention_erases_only_subjects_past_the_period(rt: FakeRuntime) -> None:
    run_enroll(rt, enroll_job(rt, "old", person=0))
    run_enroll(rt, enroll_job(rt, "new", person=1))
    assert sweep_retention(rt) == {"seen": 0, "erased": 0}  # 0 days: retention off
    rt.settings.worker.template_retention_days = 30
    assert sweep_retention(rt) == {"seen": 2, "erased": 0}
    assert sweep_retention(rt, at=now() + timedelta(days=31)) == {"seen": 2, "erased": 2}
    assert rt.s3.keys(prefix="tenants/acme/subjects/") == []


def test_an_enrolment_overtaken_after_its_commit_forgets_its_stored_result(rt: FakeRuntime) -> None:
    """The erasure's pass over Redis ran before the enrolment stored its result: the enrolment removes it again."""
    ann = enroll_job(rt, "ann")
    res = run_enroll(rt, ann)
    assert forget_if_erased(rt, ann, res) is False  # no erasure: the result stays
    Erasures(rt.store).begin("acme", "ann", "er-1", "request")
    from worker.storage.erasure import delete_subject_objects

    delete_subject_objects(rt.store, "acme", "ann")
    rt.book.save_result(ann.ref, to_wire(res))
    assert forget_if_erased(rt, ann, res) is True
    assert rt.book.get_result(ann.ref) is None and rt.book.was_erased(ann.ref)
