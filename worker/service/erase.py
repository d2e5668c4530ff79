"""Erasure, outside Celery: the ``erase`` job (one subject, or every subject of a tenant) and the retention sweep.

One subject: write the erasure record (state ``erasing``), delete every S3 object derived from the subject
(``worker.storage.erasure.delete_subject_objects``), then every Redis record naming it
(``worker.storage.jobbook.JobBook.erase_subject``; the jobs found are tombstoned so that a re-delivered message of
one of them is refused), then mark the record ``done``. Each step is idempotent, so a re-delivered erase finishes
the work. The fence against an enrolment in flight is in ``worker.storage.erasure`` (used by ``worker.service.enrol``
and ``worker.service.reissue``).

Every subject of a tenant: the tenant's record first (it fences every enrolment of the tenant), then subject after
subject in listing order; after ``worker.fanout_budget`` seconds the listing hands over to a continuation, as a key
revocation's listing does, resuming after the last subject erased (its cursor, the one subject ID the job book holds
while the erasure runs, is cleared when it finishes; a listing from the start would not do: an object store may keep
an erased subject's empty folder listed). Then the tenant's dead
letters, job bookkeeping objects, key index markers and uploaded photos, and every Redis record of its jobs.

Retention (``worker.template_retention_days``, 0 = off): ``sweep_retention`` erases every subject whose current
version was committed longer ago than that (a subject with no committed version: whose key record is that old),
under the job ID ``retention-YYYYMMDD``.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from worker.contracts import EraseJob, EraseResult, JobStatus
from worker.contracts.inputs import InputPolicy
from worker.errors import ObjectNotFoundError
from worker.service.clock import now
from worker.storage.erasure import Erasures, delete_subject_objects, delete_tenant_objects, subject_digest
from worker.storage.keyindex import subject_key_record
from worker.storage.templates import TemplateStore

if TYPE_CHECKING:
    from worker.service.runtime import Dispatch, Runtime

log = logging.getLogger(__name__)


def placeholder(tenant: str, subject: str) -> str:
    """What replaces an erased subject's ID inside other jobs' records (a key revocation's progress)."""
    return f"erased-{subject_digest(tenant, subject)[:24]}"


def input_bucket(rt: Runtime) -> str:
    return InputPolicy.from_settings(rt.settings.s3).input_bucket


def erase_subject(rt: Runtime, tenant: str, subject: str, job_id: str, reason: str) -> tuple[int, int]:
    """Erase one subject (see the module docstring); returns (S3 objects deleted, Redis keys removed or rewritten)."""
    er = Erasures(rt.store)
    er.begin(tenant, subject, job_id, reason)  # FIRST: from here on an enrolment that starts is refused
    objects, job_ids = delete_subject_objects(rt.store, tenant, subject, input_bucket=input_bucket(rt))
    keys = rt.book.erase_subject(tenant, subject, placeholder(tenant, subject), also_jobs=job_ids)
    er.finish(tenant, subject, job_id, objects)
    log.info("subject erased: %d objects, %d job-book keys", objects, keys)
    return objects, keys


def erase(
    rt: Runtime, job: EraseJob, attempt: int, started: datetime, dispatch: Dispatch, continuation: int
) -> EraseResult:
    """Run (or, re-delivered or continued, carry on) an erasure; ``running`` while a tenant-wide one continues."""
    er = Erasures(rt.store)
    if job.subject is not None:
        objects, keys = erase_subject(rt, job.tenant, job.subject, job.job_id, job.reason)
        return EraseResult(
            job_id=job.job_id,
            tenant=job.tenant,
            subject_sha256=subject_digest(job.tenant, job.subject),
            reason=job.reason,
            status=JobStatus.SUCCEEDED,
            attempts=attempt,
            started_at=started,
            finished_at=now(),
            subjects_erased=int(objects > 0),
            objects_deleted=objects,
            redis_keys_deleted=keys,
            record_uri=er.uri(job.tenant, job.subject),
        )
    book = rt.book
    er.begin(job.tenant, None, job.job_id, job.reason)  # FIRST: fences every enrolment of the tenant
    book.open_job(job.ref, "erase", tenant=job.tenant, reason=job.reason, attempts=attempt)
    f = book.get_fields(job.ref)
    cursor = f.get("erase_cursor") or None
    erased, objects = int(f.get("subjects_erased", "0")), int(f.get("objects_deleted", "0"))
    bucket = input_bucket(rt)
    t0 = time.monotonic()
    for subject in TemplateStore(rt.store).iter_subjects(job.tenant, start_after=cursor):
        n, _ = delete_subject_objects(rt.store, job.tenant, subject, input_bucket=bucket, tenant_wide=True)
        erased, objects = erased + int(n > 0), objects + n
        # the cursor names the last subject erased (its data is gone); cleared when the erasure finishes
        book.set_fields(job.ref, erase_cursor=subject, subjects_erased=erased, objects_deleted=objects)
        if time.monotonic() - t0 > rt.settings.worker.fanout_budget:
            dispatch.continue_job(job, continuation + 1)
            log.info("erase %s: %d subjects erased, continuing in a new task", job.job_id, erased)
            return _tenant_result(job, JobStatus.RUNNING, attempt, started, erased, objects, 0, None)
    objects += delete_tenant_objects(rt.store, job.tenant, input_bucket=bucket)
    keys = book.erase_tenant(job.tenant, keep=job.ref)
    book.set_fields(job.ref, erase_cursor="")
    er.finish(job.tenant, None, job.job_id, objects)
    book.close_job(job.ref, "succeeded")
    return _tenant_result(job, JobStatus.SUCCEEDED, attempt, started, erased, objects, keys, er.uri(job.tenant, None))


def _tenant_result(
    job: EraseJob,
    status: JobStatus,
    attempt: int,
    started: datetime,
    erased: int,
    objects: int,
    keys: int,
    uri: str | None,
) -> EraseResult:
    return EraseResult(
        job_id=job.job_id,
        tenant=job.tenant,
        all_subjects=True,
        reason=job.reason,
        status=status,
        attempts=attempt,
        started_at=started,
        finished_at=now() if status.terminal else None,
        subjects_erased=erased,
        objects_deleted=objects,
        redis_keys_deleted=keys,
        record_uri=uri,
    )


def _last_touched(ts: TemplateStore, tenant: str, subject: str) -> datetime | None:
    """When the subject's current version was committed (no version: when its key record last changed)."""
    p = ts.read_pointer(tenant, subject)
    if p is not None and p[0].version is not None:
        try:
            return ts.get_manifest(tenant, subject, p[0].version).committed_at
        except ObjectNotFoundError:
            return None
    rec = subject_key_record(ts.store, tenant, subject)
    return None if rec is None else rec.updated_at


def sweep_retention(rt: Runtime, at: datetime | None = None) -> dict[str, int]:
    """Erase every subject whose current version is older than ``worker.template_retention_days`` (0: nothing).
    Returns counts (subjects seen, subjects erased)."""
    days = rt.settings.worker.template_retention_days
    if days <= 0:
        return {"seen": 0, "erased": 0}
    at = at or now()
    cutoff = at - timedelta(days=days)
    job_id = f"retention-{at:%Y%m%d}"
    ts = TemplateStore(rt.store)
    seen = erased = 0
    for tenant in list(rt.store.list_dirs("tenants/")):
        for subject in list(ts.iter_subjects(tenant)):
            seen += 1
            last = _last_touched(ts, tenant, subject)
            if last is not None and last < cutoff:
                erase_subject(rt, tenant, subject, job_id, f"retention period of {days} days ended")
                erased += 1
    log.info("retention sweep done", extra={"subjects": seen, "erased": erased})
    return {"seen": seen, "erased": erased}


__all__ = ["erase", "erase_subject", "placeholder", "sweep_retention"]
