"""``worker.service.verify.verify`` on the fake runtime: the decision at the threshold (a score equal to the
threshold accepts), the calibrated false-accept-rate rule, and the refusals (no template, revoked template, another
engine, another matcher)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from service_fakes import FakeRuntime, face_png
from service_helpers import enroll_job, job, run_enroll

from worker.bundle_config import VerifyPolicy
from worker.contracts import JobStatus, VerifyJob, VerifyResult
from worker.errors import (
    BundleError,
    MatcherMismatchError,
    NoTemplateError,
    RevokedKeyError,
    UncalibratedFarError,
)
from worker.service.clock import now
from worker.service.verify import verify
from worker.storage.templates import TemplateStore


def verify_job(rt: FakeRuntime, subject: str, person: int, capture: int = 5, **kw: object) -> VerifyJob:
    probe = rt.put_input("acme", f"probe-{subject}-{person}-{capture}.png", face_png(person, capture))
    v: VerifyJob = job(kind="verify", tenant="acme", subject=subject, probe=probe, **kw)
    return v


def run_verify(rt: FakeRuntime, j: VerifyJob) -> VerifyResult:
    return verify(rt, j, 1, now())


@pytest.fixture
def enrolled(rt: FakeRuntime) -> FakeRuntime:
    assert run_enroll(rt, enroll_job(rt, "ann", person=0, captures=2)).status == JobStatus.SUCCEEDED
    return rt


def test_a_score_equal_to_the_threshold_accepts_and_one_just_above_rejects(enrolled: FakeRuntime) -> None:
    rt = enrolled
    first = run_verify(rt, verify_job(rt, "ann", 0))
    s = first.score
    assert first.status == JobStatus.SUCCEEDED and -1.0 <= s <= 1.0
    assert (first.version, first.key_id, first.key_version, first.enrolment_size) == (1, "k1", 1, 2)
    at = run_verify(rt, verify_job(rt, "ann", 0, threshold=s))
    above = run_verify(rt, verify_job(rt, "ann", 0, threshold=math.nextafter(s, 2.0)))
    below = run_verify(rt, verify_job(rt, "ann", 0, threshold=math.nextafter(s, -2.0)))
    assert at.score == above.score == below.score == s  # deterministic: the same probe under the same key
    assert (at.decision, at.threshold) == ("accept", s)
    assert (above.decision, below.decision) == ("reject", "accept")


def test_without_a_threshold_the_worker_threshold_decides(enrolled: FakeRuntime) -> None:
    rt = enrolled
    res = run_verify(rt, verify_job(rt, "ann", 0))
    assert res.threshold == rt.loaded.verify_threshold
    assert res.decision == ("accept" if res.score >= res.threshold else "reject")
    assert res.far is None  # no calibration: the threshold stands for no measured FAR


def test_a_far_without_calibration_is_refused(enrolled: FakeRuntime) -> None:
    with pytest.raises(UncalibratedFarError):
        run_verify(enrolled, verify_job(enrolled, "ann", 0, far=1e-3))


def _calibrated(rt: FakeRuntime, threshold: float) -> None:
    points = {
        "2": [
            {"far_target": 1e-2, "threshold": threshold - 0.5, "far": 0.009, "far_ci95": [0.008, 0.011]},
            {"far_target": 1e-3, "threshold": threshold, "far": 0.0009, "far_ci95": [0.0005, 0.0012]},
        ]
    }
    policy = VerifyPolicy("", 0.5, False, {"2": threshold}, points)
    rt.loaded = dataclasses.replace(rt.loaded, policy=policy)


def test_a_far_picks_the_calibrated_threshold_of_the_enrolment_size(enrolled: FakeRuntime) -> None:
    rt = enrolled
    s = run_verify(rt, verify_job(rt, "ann", 0)).score
    _calibrated(rt, math.nextafter(s, 2.0))  # the 1e-3 point lies just above this probe's score
    strict = run_verify(rt, verify_job(rt, "ann", 0, far=1e-3))
    assert (strict.threshold, strict.far, strict.decision) == (math.nextafter(s, 2.0), 0.0009, "reject")
    assert strict.far_ci95 == (0.0005, 0.0012)
    loose = run_verify(rt, verify_job(rt, "ann", 0, far=0.05))  # the loosest point at or below 5 %: 1e-2
    assert (loose.far, loose.decision) == (0.009, "accept")
    with pytest.raises(UncalibratedFarError):
        run_verify(rt, verify_job(rt, "ann", 0, far=1e-4))
    default = run_verify(rt, verify_job(rt, "ann", 0))  # size 2's calibrated threshold, not the worker's 0.5
    assert (default.threshold, default.far) == (math.nextafter(s, 2.0), 0.0009)


def test_no_template_is_refused(rt: FakeRuntime) -> None:
    with pytest.raises(NoTemplateError):
        run_verify(rt, verify_job(rt, "nobody", 0))
    assert rt.engine_calls == []


def test_a_revoked_current_template_is_refused(enrolled: FakeRuntime) -> None:
    TemplateStore(enrolled.store).mark_revoked("acme", "ann", 1, reason="test", job_id="rv-1")
    enrolled.engine_calls.clear()
    with pytest.raises(RevokedKeyError):
        run_verify(enrolled, verify_job(enrolled, "ann", 0))
    assert enrolled.engine_calls == []


def test_a_template_of_other_engine_settings_is_refused(enrolled: FakeRuntime) -> None:
    rt = enrolled
    rt.loaded = dataclasses.replace(rt.loaded, fingerprint="tiny-test:other")
    with pytest.raises(BundleError) as e:
        run_verify(rt, verify_job(rt, "ann", 0))
    assert type(e.value) is BundleError


def test_a_template_of_another_matcher_is_refused(rt: FakeRuntime) -> None:
    rt.loaded = dataclasses.replace(rt.loaded, matcher="cosine-a")
    run_enroll(rt, enroll_job(rt, "ann"))
    assert run_verify(rt, verify_job(rt, "ann", 0)).matcher == "cosine-a"
    rt.loaded = dataclasses.replace(rt.loaded, matcher="cosine-b")
    with pytest.raises(MatcherMismatchError):
        run_verify(rt, verify_job(rt, "ann", 0))


def test_verify_writes_nothing(enrolled: FakeRuntime) -> None:
    rt = enrolled
    j = verify_job(rt, "ann", 0)
    rt.s3.calls.clear()
    run_verify(rt, j)
    assert [c for c in rt.s3.calls if c[0] in ("put", "delete")] == []
