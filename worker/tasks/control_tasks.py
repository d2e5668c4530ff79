"""Control-queue tasks: revocation fan-out and bulk manifest streaming (no models loaded here), and housekeeping.

Thin: ``revoke`` and ``bulk`` are ``JobTask``s whose ``handle`` calls ``worker.service.revoke`` / ``bulk`` with a
``CeleryDispatch`` (chunks and enrol children to the engine queue by task name, continuations as this task again).
``ping``, ``sweep_staging`` (beat) and ``reconcile`` (beat) are plain tasks.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.broker.config import (
    ENGINE_BULK_QUEUE,
    TASK_BULK,
    TASK_ENROLL,
    TASK_ERASE,
    TASK_PING,
    TASK_RECONCILE,
    TASK_REENROLL_CHUNK,
    TASK_REVOKE,
    TASK_SWEEP_RETENTION,
    TASK_SWEEP_STAGING,
    TASK_SWEEP_UPLOADS,
)
from worker.broker.publish import BatchSender, short_argsrepr
from worker.contracts import (
    BulkJob,
    BulkResult,
    EraseJob,
    EraseResult,
    RevokeJob,
    RevokeResult,
    child_job_id,
    job_ref,
    parse_job_ref,
    to_wire,
)
from worker.errors import NoTemplateError
from worker.service import bulk as bulk_service
from worker.service import erase as erase_service
from worker.service import revoke as revoke_service
from worker.service.clock import now
from worker.tasks.app import app
from worker.tasks.envelope import Delivery, JobTask

if TYPE_CHECKING:
    from worker.service.runtime import Runtime

log = logging.getLogger(__name__)


# --- sending: the Celery side of the service's Dispatch ----------------------------------------------------------
class CeleryDispatch:
    """The service's ``Dispatch`` on Celery: re-enrolment chunks and enrol children go to the bulk engine queue
    (behind interactive work), a continuation is the sending task again under ``<job_id>-c<n>``. One per run of a
    fan-out task. Enrol children go out one Redis round trip per call (``worker.broker.publish.BatchSender``: their
    message template is built once per run)."""

    def __init__(self, task: Any, parent_id: str, redis: Any) -> None:
        self.task = task
        self.redis = redis
        self.children = BatchSender(app, kwargs={"parent": parent_id}, retry=False)

    def send_chunk(self, payload: dict[str, Any]) -> None:
        app.send_task(
            TASK_REENROLL_CHUNK,
            args=[payload],
            task_id=job_ref(payload["tenant"], payload["job_id"]),
            queue=ENGINE_BULK_QUEUE,
            ignore_result=True,
        )

    def send_enrolls(self, pending: list[tuple[str, dict[str, Any]]]) -> None:
        self.children.send(
            [
                (
                    TASK_ENROLL,
                    ENGINE_BULK_QUEUE,
                    job_ref(payload["tenant"], cid),
                    payload,
                    short_argsrepr("enroll", cid),
                )
                for cid, payload in pending
            ]
        )

    def engine_queue_depth(self) -> int:
        try:
            return int(self.redis.llen(ENGINE_BULK_QUEUE))
        except Exception:  # backpressure is best effort
            return 0

    def continue_job(
        self, job: RevokeJob | BulkJob | EraseJob, continuation: int, countdown: float | None = None
    ) -> None:
        self.task.apply_async(
            args=[to_wire(job)],
            kwargs={"continuation": continuation},
            **({} if countdown is None else {"countdown": countdown}),
            task_id=f"{job.ref}-c{continuation}",
            ignore_result=True,
        )


def _dispatch(task: Any, job: RevokeJob | BulkJob | EraseJob) -> CeleryDispatch:
    from worker.tasks.runtime import get_runtime

    return CeleryDispatch(task, job.job_id, get_runtime().redis)


# --- revoke ---------------------------------------------------------------------------------------------------------
class RevokeTask(JobTask[RevokeJob, RevokeResult]):
    """Start a revocation (``RevokeJob`` JSON) -> ``RevokeResult`` JSON (``running``; the final one is stored in
    Redis by the last re-enrolment chunk). ``continuation``: a key's subject listing handed over to a fresh task."""

    name = TASK_REVOKE
    job_model = RevokeJob
    result_model = RevokeResult
    job_type = "revoke"

    def run(self, *args: Any, continuation: int = 0, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(continuation, int) or continuation < 0:
            kwargs["continuation"] = continuation
            continuation = 0
        return self.run_job(args, kwargs, Delivery(continuation=continuation))

    def handle(self, rt: Runtime, job: RevokeJob, attempt: int, started: datetime, delivery: Delivery) -> RevokeResult:
        return revoke_service.revoke(rt, job, attempt, started, _dispatch(self, job), delivery.continuation)

    def ident(self, job: RevokeJob) -> dict[str, Any]:
        return {"subject": job.subject, "key_id": job.key_id, "reason": job.reason}

    def attempt_key(self, job: RevokeJob, delivery: Delivery) -> str:
        return job.ref if delivery.continuation == 0 else f"{job.ref}-c{delivery.continuation}"


revoke = app.register_task(RevokeTask())


# --- bulk -----------------------------------------------------------------------------------------------------------
class BulkTask(JobTask[BulkJob, BulkResult]):
    """Stream a bulk manifest (``BulkJob`` JSON) into enroll tasks -> ``BulkResult`` JSON (``running`` until every
    enrolment finished; the last one stores the terminal result)."""

    name = TASK_BULK
    job_model = BulkJob
    result_model = BulkResult
    job_type = "bulk"

    def run(self, *args: Any, continuation: int = 0, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(continuation, int) or continuation < 0:
            kwargs["continuation"] = continuation
            continuation = 0
        return self.run_job(args, kwargs, Delivery(continuation=continuation))

    def handle(self, rt: Runtime, job: BulkJob, attempt: int, started: datetime, delivery: Delivery) -> BulkResult:
        return bulk_service.bulk(rt, job, attempt, started, _dispatch(self, job), delivery.continuation)

    def attempt_key(self, job: BulkJob, delivery: Delivery) -> str:
        return f"{job.ref}-c{delivery.continuation}"


bulk = app.register_task(BulkTask())


# --- erase ----------------------------------------------------------------------------------------------------------
class EraseTask(JobTask[EraseJob, EraseResult]):
    """Erase a subject, or every subject of a tenant (``EraseJob`` JSON) -> ``EraseResult`` JSON (a tenant-wide one
    returns ``running`` while continuations carry on; the last stores the terminal result)."""

    name = TASK_ERASE
    job_model = EraseJob
    result_model = EraseResult
    job_type = "erase"

    def run(self, *args: Any, continuation: int = 0, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(continuation, int) or continuation < 0:
            kwargs["continuation"] = continuation
            continuation = 0
        return self.run_job(args, kwargs, Delivery(continuation=continuation))

    def handle(self, rt: Runtime, job: EraseJob, attempt: int, started: datetime, delivery: Delivery) -> EraseResult:
        return erase_service.erase(rt, job, attempt, started, _dispatch(self, job), delivery.continuation)

    def ident(self, job: EraseJob) -> dict[str, Any]:
        from worker.storage.erasure import subject_digest

        sha = None if job.subject is None else subject_digest(job.tenant, job.subject)
        return {"subject_sha256": sha, "all_subjects": job.all_subjects, "reason": job.reason}

    def attempt_key(self, job: EraseJob, delivery: Delivery) -> str:
        return job.ref if delivery.continuation == 0 else f"{job.ref}-c{delivery.continuation}"


erase = app.register_task(EraseTask())


@app.task(name=TASK_SWEEP_RETENTION)
def sweep_retention_task(at: str | None = None) -> dict[str, Any]:
    """Erase subjects past ``worker.template_retention_days`` (``worker.service.erase.sweep_retention``). Sent daily
    by Celery beat when the setting is on; safe to run twice. ``at``: ISO time to sweep as of (default: now)."""
    from worker.tasks.runtime import get_runtime

    when = datetime.fromisoformat(at) if isinstance(at, str) else None
    return erase_service.sweep_retention(get_runtime(), when)


@app.task(name=TASK_PING)
def ping() -> dict[str, Any]:
    """Liveness of a control worker."""
    return {"pid": os.getpid(), "at": now().isoformat()}


@app.task(name=TASK_SWEEP_STAGING)
def sweep_staging(tenant: str | None = None) -> dict[str, Any]:
    """Delete staged objects no committed version names, older than the visibility timeout (so that a commit still
    in flight, or a job Redis may still re-deliver, keeps its artefacts). Sent by Celery beat; safe to run twice."""
    from worker.storage.templates import TemplateStore
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    started = time.monotonic()
    swept, deleted = TemplateStore(rt.store).sweep_all_staging(
        older_than_s=float(rt.settings.worker.visibility_timeout), tenant=tenant
    )
    log.info("staging sweep done", extra={"subjects": swept, "deleted": deleted})
    return {"subjects": swept, "deleted": deleted, "seconds": round(time.monotonic() - started, 3)}


@app.task(name=TASK_SWEEP_UPLOADS)
def sweep_uploads_task(older_than_s: float | None = None) -> dict[str, Any]:
    """Delete the CLI's uploaded photos older than ``worker.upload_retention`` (or ``older_than_s``) from the input
    bucket (``worker.storage.uploads``). Sent by Celery beat; safe to run twice."""
    from worker.contracts.inputs import InputPolicy
    from worker.storage.uploads import sweep_uploads
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    retention = float(rt.settings.worker.upload_retention if older_than_s is None else older_than_s)
    if retention <= 0 and older_than_s is None:
        return {"seen": 0, "deleted": 0, "seconds": 0.0}  # retention 0: uploads are kept
    started = time.monotonic()
    bucket = InputPolicy.from_settings(rt.settings.s3).input_bucket
    seen, deleted = sweep_uploads(rt.store, bucket, older_than_s=retention)
    log.info("upload sweep done", extra={"uploads": seen, "deleted": deleted})
    return {"seen": seen, "deleted": deleted, "seconds": round(time.monotonic() - started, 3)}


def _repair_bulk(rt: Runtime, ref: str) -> int:
    """Count the finished children a bulk parent (job reference ``ref``) missed (a report lost to a Redis outage):
    every row whose child has a stored terminal result but is not counted is reported now. Returns the number
    repaired."""
    from worker.contracts import EnrollResult
    from worker.service.fanout import report_bulk_child

    book = rt.book
    tenant, parent = parse_job_ref(ref)
    f = book.get_fields(ref)
    last_line = int(f.get("last_line") or f.get("total") or 0)
    repaired = 0
    for start in range(1, last_line + 1, 1000):  # one pipelined round trip per 1,000 lines
        ids = [child_job_id(parent, "line", n) for n in range(start, min(start + 1000, last_line + 1))]
        for cid, raw in book.unreported_children(ref, {c: job_ref(tenant, c) for c in ids}):
            if raw.get("kind") == "enroll":
                report_bulk_child(rt, tenant, parent, cid, EnrollResult.model_validate(raw))
                repaired += 1
    return repaired


@app.task(name=TASK_RECONCILE)
def reconcile(limit: int = 1000, idle_s: float = 600.0) -> dict[str, Any]:
    """Periodic repair (Celery beat), safe to run twice:

    - dead letters recorded only in Redis while S3 was down are written to S3;
    - bulk parents idle for ``idle_s`` with their listing done get the children they missed counted (and are
      finalised when that completes them). Results are stored before acks (``JobTask._finish``), so this is the
      belt to those braces.
    """
    from worker.storage.deadletters import write_dead_letter
    from worker.storage.records import DeadLetter
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    book = rt.book
    repaired = 0
    for ref in book.open_jobs(limit):
        f = book.get_fields(ref)
        idle = time.time() - float(f.get("updated") or 0) > idle_s
        if f.get("kind") == "bulk" and f.get("listing") == "done" and idle:
            repaired += _repair_bulk(rt, ref)
    synced = 0
    for ref in book.dead_letters(limit):
        rec = book.get_dead_letter(ref)
        if rec is None or rec.get("s3_uri") or not rec.get("tenant") or rec.get("raw_sha256"):
            continue  # already in S3, or a refused message (Redis only, by hash and size: it never was a job)
        fields = {k: v for k, v in rec.items() if k in DeadLetter.model_fields}
        uri = write_dead_letter(rt.store, DeadLetter.model_validate(fields))
        book.add_dead_letter(ref, {**rec, "s3_uri": uri})
        synced += 1
    if synced or repaired:
        log.info("reconcile: %d dead letters written to S3, %d bulk children counted", synced, repaired)
    return {"dead_letters_synced": synced, "bulk_children_repaired": repaired}


__all__ = [
    "bulk",
    "erase",
    "sweep_retention_task",
    "ping",
    "reconcile",
    "revoke",
    "sweep_staging",
    "sweep_uploads_task",
    "NoTemplateError",
]
