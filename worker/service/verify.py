"""Verification, outside Celery: anonymise a probe under the subject's current key version and score it against
the subject's current template. Writes nothing to S3."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from worker.contracts import JobStatus, S3Ref, VerifyJob, VerifyResult
from worker.errors import BundleError, MatcherMismatchError, RevokedKeyError
from worker.service.clock import now
from worker.service.enrol import fetch_and_prepare, seed_for
from worker.storage.templates import TemplateStore

if TYPE_CHECKING:
    from worker.service.engine import LoadedEngine
    from worker.service.runtime import Runtime


@dataclass(frozen=True)
class ProbeScore:
    """A probe's score against the current template, and which version (and key version) it was scored against."""

    version: int
    key_id: str
    key_version: int
    score: float
    enrolment_size: int
    matcher: str | None


def verify_probe(rt: Runtime, loaded: LoadedEngine, tenant: str, subject: str, probe: S3Ref) -> ProbeScore:
    """Score ``probe`` against the subject's current template under the subject's current key version."""
    import torch

    ts = TemplateStore(rt.store)
    cur = ts.current(tenant, subject)  # NoTemplateError
    m = cur.manifest
    if cur.superseded or ts.is_revoked(tenant, subject, cur.version):
        raise RevokedKeyError(f"current template of {tenant}/{subject} (version {cur.version}) is revoked")
    tmpl = ts.load_template(m)
    made_with = tmpl.algorithm.get("fingerprint") or f"{tmpl.bundle_id}:?"
    if tmpl.bundle_id != loaded.bundle_id or (tmpl.algorithm.get("fingerprint") and made_with != loaded.fingerprint):
        raise BundleError(
            f"template version {cur.version} was made by engine {made_with}; this worker runs "
            f"{loaded.fingerprint}: probes are only comparable under the same bundle and engine settings "
            "(re-enrol, or route to a matching worker)"
        )
    if tmpl.matcher is not None and loaded.matcher and tmpl.matcher != loaded.matcher:
        raise MatcherMismatchError(
            f"template version {cur.version} is scored by matcher {tmpl.matcher}; this worker's bundle verifies "
            f"with {loaded.matcher}: scores and thresholds are not comparable (re-enrol under this bundle)"
        )
    seed = seed_for(rt, m.key_id, tenant, subject, m.key_version, "verify")
    prepared = fetch_and_prepare(rt, loaded.engine, tenant, [probe], "verify")
    # a probe is a one-image subject, anonymised under its own key (batch mates, if any, do not change it)
    (res,) = rt.engine_call("verify", [(prepared.faces[0][None], seed)])
    # cosine; fp32 rounding can step just outside [-1, 1]
    score = min(1.0, max(-1.0, loaded.engine.score(res.embeddings[0], torch.from_numpy(tmpl.vector()))))
    return ProbeScore(cur.version, m.key_id, m.key_version, score, tmpl.size(), tmpl.matcher or loaded.matcher or None)


def verify(rt: Runtime, job: VerifyJob, attempt: int, started: datetime) -> VerifyResult:
    """A verify job: the probe's score and the decision against the job's threshold, else the bundle's calibrated
    threshold for the job's false-accept rate, else the worker's threshold for the template's enrolment size; the
    result states the false-accept rate the threshold stands for."""
    loaded = rt.engine()
    policy = loaded.verify_policy()
    out = verify_probe(rt, loaded, job.tenant, job.subject, job.probe)
    rule = policy.decide(out.enrolment_size, job.threshold, job.far)  # UncalibratedFarError
    return VerifyResult(
        job_id=job.job_id,
        tenant=job.tenant,
        subject=job.subject,
        status=JobStatus.SUCCEEDED,
        attempts=attempt,
        started_at=started,
        finished_at=now(),
        version=out.version,
        key_id=out.key_id,
        key_version=out.key_version,
        score=out.score,
        threshold=rule.threshold,
        decision="accept" if out.score >= rule.threshold else "reject",
        far=rule.far,
        far_ci95=rule.far_ci95,
        enrolment_size=out.enrolment_size,
        matcher=out.matcher,
    )
