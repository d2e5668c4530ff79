"""Fan-out bookkeeping shared by the control jobs (revoke, bulk) and the engine jobs that finish their items.

Progress is idempotent Redis counters (``worker.storage.jobbook.JobBook``), never chords: each finished item is a set
member, and whichever chunk (or the parent, when it learns the total last) sees done == total first wins a
``SET NX`` and writes the job's terminal result. The wire models of a revocation's chunks are in
``worker.contracts.chunks``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from worker import metrics
from worker.contracts import (
    BulkResult,
    EnrollResult,
    ErrorCode,
    JobError,
    JobStatus,
    RevokeResult,
    job_ref,
    to_wire,
)
from worker.service.clock import now

if TYPE_CHECKING:
    from worker.service.runtime import Runtime

log = logging.getLogger(__name__)


# --- revoke ---------------------------------------------------------------------------------------------------------
def maybe_finalize_revoke(rt: Runtime, tenant: str, parent_job_id: str) -> dict[str, Any] | None:
    """Write the revoke job's terminal result if every subject is accounted for and nobody did it yet."""
    book = rt.book
    pref = job_ref(tenant, parent_job_id)
    if not book.claim_finaliser(pref):
        return None
    f = book.get_fields(pref)
    p = book.progress(pref)
    infos = book.item_info(pref)
    subject = f.get("subject") or None
    res: dict[str, Any] = {
        "job_id": parent_job_id,
        "tenant": f["tenant"],
        "subject": subject,
        "key_id": f.get("key_id") or None,
        "reason": f.get("reason"),
        "subjects_total": p.total or 0,
        "subjects_done": p.succeeded,
        "subjects_failed": p.failed,
        "subjects_fenced": int(f.get("subjects_fenced", "0")),
        "attempts": int(f.get("attempts", "1")),
        "finished_at": now(),
    }
    revoked: list[int] = []
    uris: list[str] = []
    for info in infos.values():
        revoked.extend(info.get("revoked_versions", []))
        uris.extend(info.get("revocation_uris", []))
    res["revocation_uris"] = sorted(uris)
    if subject is not None:
        info = infos.get(subject, {})
        res["revoked_versions"] = sorted(revoked)
        res["new_version"] = info.get("new_version")
        res["new_key_id"] = info.get("new_key_id")
        res["new_key_version"] = info.get("new_key_version")
        res["manifest_uri"] = info.get("manifest_uri")
    else:
        res["new_key_id"] = f.get("new_key_id") or None
    if p.failed:
        codes = Counter(p.failed_codes)
        code = codes.most_common(1)[0][0]
        res["status"] = JobStatus.FAILED
        res["error"] = JobError(code=ErrorCode(code), message=f"{p.failed} of {p.total} subjects failed; first: {code}")
    else:
        res["status"] = JobStatus.SUCCEEDED
    wire = to_wire(RevokeResult(**res))
    book.save_result(pref, wire)
    book.close_job(pref, wire["status"])
    (log.warning if p.failed else log.info)(
        "revoke job %s finished: %s, %d done, %d failed", parent_job_id, wire["status"], p.succeeded, p.failed
    )
    return wire


# --- bulk -----------------------------------------------------------------------------------------------------------
def report_bulk_child(rt: Runtime, tenant: str, parent_job_id: str, child_job_id: str, result: EnrollResult) -> None:
    """An enrolment of ``tenant``'s bulk job ``parent_job_id`` reached a terminal state: count it, maybe finalise the
    bulk job."""
    book = rt.book
    pref = job_ref(tenant, parent_job_id)
    status = JobStatus(result.status)
    if status == JobStatus.SUCCEEDED:
        if not book.is_item_done(pref, child_job_id):
            metrics.fanout_items("bulk", 1, "succeeded")
        book.mark_succeeded(pref, [child_job_id])
    else:
        code = result.error.code.value if result.error is not None else ErrorCode.INTERNAL_ERROR.value
        if status == JobStatus.DEAD_LETTERED:
            code = ErrorCode.DEAD_LETTERED.value
        metrics.fanout_items("bulk", 1, "failed")
        message = result.error.message if result.error is not None else ""
        book.mark_failed_rows(pref, {child_job_id: {"subject": result.subject, "code": code, "message": message[:500]}})
    maybe_finalize_bulk(rt, tenant, parent_job_id)


def maybe_finalize_bulk(rt: Runtime, tenant: str, parent_job_id: str) -> dict[str, Any] | None:
    book = rt.book
    pref = job_ref(tenant, parent_job_id)
    f = book.get_fields(pref)
    if f.get("listing") != "done":
        return None
    if not book.claim_finaliser(pref):
        return None
    p = book.progress(pref)
    codes = dict(p.failed_codes)
    report_uri = None
    try:
        from worker.service.bulk_report import write_report

        report_uri = write_report(rt, parent_job_id, f["tenant"])
    except Exception as e:  # the job's counts are final either way; the report is best effort
        log.warning("bulk job %s: report not written (%s)", parent_job_id, type(e).__name__)
    res = BulkResult(
        job_id=parent_job_id,
        tenant=f["tenant"],
        status=JobStatus.SUCCEEDED if not p.failed else JobStatus.FAILED,
        error=None
        if not p.failed
        else JobError(code=ErrorCode(Counter(codes).most_common(1)[0][0]), message=f"{p.failed} of {p.total} failed"),
        total=p.total,
        enqueued=int(f.get("enqueued", "0")),
        succeeded=p.succeeded,
        failed=p.failed,
        dead_lettered=codes.get(ErrorCode.DEAD_LETTERED.value, 0),
        errors_by_code={ErrorCode(k): v for k, v in codes.items()},
        report_uri=report_uri,
        attempts=int(f.get("attempts", "1")),
        finished_at=now(),
    )
    wire = to_wire(res)
    book.save_result(pref, wire)
    book.close_job(pref, wire["status"])
    (log.warning if p.failed else log.info)(
        "bulk job %s finished: %s, %d succeeded, %d failed of %s",
        parent_job_id,
        wire["status"],
        p.succeeded,
        p.failed,
        p.total,
    )
    return wire
