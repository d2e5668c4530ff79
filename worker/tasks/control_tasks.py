"""Control-queue tasks: revocation fan-out and bulk manifest streaming (no models loaded here).

``revoke``: subject -> one re-enrolment chunk; whole key -> mark the key revoked, list the tenant's subjects under
it, send them in chunks of ``worker.revoke_chunk_size`` to the engine queue. The parent returns a ``running``
result; the last chunk writes the terminal one (``worker.tasks.fanout``).

``bulk``: stream the manifest (constant memory), send one ``enroll`` per subject with a deterministic child job ID,
``chunk_size`` at a time, saving a cursor (rows sent) in Redis after each chunk. A re-delivered or re-submitted bulk
job skips the rows before the cursor; rows sent twice are harmless (same child job ID -> same result). The task
stops after a time budget or while the engine queue is deep (backpressure) and re-queues itself to continue.
"""

from __future__ import annotations

import codecs
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from worker.contracts import (
    BulkResult,
    EnrollJob,
    JobStatus,
    ManifestRowError,
    RevokeResult,
    child_job_id,
    iter_csv,
    iter_jsonl,
    iter_prefix,
    to_wire,
)
from worker.errors import NoTemplateError
from worker.tasks.app import app
from worker.tasks.common import now, run_job
from worker.tasks.config import (
    ENGINE_QUEUE,
    TASK_BULK,
    TASK_ENROLL,
    TASK_PING,
    TASK_RECONCILE,
    TASK_REENROLL_CHUNK,
    TASK_REVOKE,
    TASK_SWEEP_STAGING,
)
from worker.tasks.fanout import ReenrollChunk, maybe_finalize_bulk, maybe_finalize_revoke

log = logging.getLogger(__name__)

BULK_MAX_QUEUE_DEPTH_CHUNKS = 8  # backpressure: pause while the engine queue holds more than this many chunks
BULK_PAUSE_S = 5.0
MAX_MANIFEST_LINE = 64 * 1024  # characters; a row of 32 image refs of 1 KiB fits twice
TOO_LONG = "<line too long>\n"  # the sentinel _lines yields (compared by identity)
REVOKE_READ_THREADS = 16  # concurrent per-subject S3 reads while listing a revoked key's subjects


# --- revoke ---------------------------------------------------------------------------------------------------------
def _send_chunk(rt: Any, job: Any, index: int, subjects: list[str]) -> None:
    chunk = ReenrollChunk(
        job_id=child_job_id(job.job_id, "chunk", index),
        parent_job_id=job.job_id,
        tenant=job.tenant,
        subjects=subjects,
        reason=job.reason,
        new_key_id=job.new_key_id,
        purge_old_images=job.purge_old_images,
    )
    payload = chunk.model_dump(mode="json")
    rt.book.push_chunk(job.job_id, index, payload)
    app.send_task(TASK_REENROLL_CHUNK, args=[payload], task_id=chunk.job_id, queue=ENGINE_QUEUE, ignore_result=True)


def _under_key(rt: Any, job: Any, subject: str) -> bool:
    """Whether ``subject`` is to be reissued: its key record is under the revoked key (or was moved off it by this
    job) and it has a committed version. Two S3 GETs."""
    from worker.keys.providers import KeyRegistry
    from worker.storage.templates import TemplateStore

    rec = KeyRegistry(rt.store).subject_key(job.tenant, subject)
    if rec is None:
        return False
    if rec.key_id != job.key_id and not any(h.get("job_id") == job.job_id for h in rec.history):
        return False
    return TemplateStore(rt.store).read_pointer(job.tenant, subject) is not None  # never committed: nothing to reissue


def _subjects_under_key(rt: Any, job: Any, start_after: str | None) -> Iterator[tuple[str, bool]]:
    """(subject, under the revoked key?) for the tenant's subjects in listing order after ``start_after``; the
    per-subject reads run ``REVOKE_READ_THREADS`` at a time (boto3 clients are thread-safe)."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.storage.templates import TemplateStore

    names = TemplateStore(rt.store).iter_subjects(job.tenant, start_after)
    with ThreadPoolExecutor(REVOKE_READ_THREADS) as pool:
        while True:
            page = [n for _, n in zip(range(REVOKE_READ_THREADS * 4), names, strict=False)]
            if not page:
                return
            yield from zip(page, pool.map(lambda s: _under_key(rt, job, s), page), strict=True)


def _revoke(rt: Any, job: Any, attempt: int, started: datetime, task: Any, continuation: int) -> RevokeResult:
    from worker.keys.providers import KeyRegistry
    from worker.storage.templates import TemplateStore

    book = rt.book
    fields = {
        "tenant": job.tenant,
        "reason": job.reason,
        "attempts": attempt,
        "subject": job.subject or "",
        "key_id": job.key_id or "",
        "new_key_id": job.new_key_id or "",
    }
    if job.new_key_id is not None:
        rt.keys.check_usable(job.tenant, job.new_key_id)  # unknown / revoked replacement: fail before any change
    if job.subject is not None:
        TemplateStore(rt.store).current(job.tenant, job.subject)  # NoTemplateError before any state change
    book.open_job(job.job_id, "revoke", **fields)
    if book.get_fields(job.job_id).get("listing") == "done":
        for i, payload in enumerate(book.chunks(job.job_id)):  # re-delivered parent: re-send, chunks are idempotent
            app.send_task(
                TASK_REENROLL_CHUNK, args=[payload], task_id=payload["job_id"], queue=ENGINE_QUEUE, ignore_result=True
            )
            log.debug("re-sent chunk %d of %s", i, job.job_id)
    elif job.subject is not None:
        book.set_total(job.job_id, 1)
        _send_chunk(rt, job, 0, [job.subject])
        book.set_fields(job.job_id, listing="done")
    else:
        KeyRegistry(rt.store).revoke_key(job.tenant, job.key_id, reason=job.reason, job_id=job.job_id)
        if not _list_key_subjects(rt, job, task, continuation):
            return _revoke_status(rt, job, attempt, started)  # handed over to a continuation
    return _revoke_status(rt, job, attempt, started)


def _list_key_subjects(rt: Any, job: Any, task: Any, continuation: int) -> bool:
    """Send the subjects under the revoked key in chunks, from the saved cursor (the last subject listed). After a
    time budget, save the cursor and re-queue the task as a continuation (returns False); True when the listing
    is complete. A re-delivered continuation re-sends at most one chunk, under the same chunk ID (idempotent)."""
    book = rt.book
    fields = book.get_fields(job.job_id)
    cursor = fields.get("listing_cursor") or None
    index, total = int(fields.get("chunks_sent", "0")), int(fields.get("subjects_listed", "0"))
    size = rt.settings.worker.revoke_chunk_size
    budget = rt.settings.worker.fanout_budget
    t0 = time.monotonic()
    batch: list[str] = []
    last = cursor
    for subject, hit in _subjects_under_key(rt, job, cursor):
        last = subject
        if hit:
            batch.append(subject)
        if len(batch) >= size:
            _send_chunk(rt, job, index, batch)
            index, total, batch = index + 1, total + len(batch), []
            book.set_fields(job.job_id, listing_cursor=last or "", chunks_sent=index, subjects_listed=total)
            if time.monotonic() - t0 > budget:
                task.apply_async(
                    args=[to_wire(job)],
                    kwargs={"continuation": continuation + 1},
                    task_id=f"{job.job_id}-c{continuation + 1}",
                    ignore_result=True,
                )
                log.info("revoke %s: %d subjects listed, continuing in a new task", job.job_id, total)
                return False
    if batch:
        _send_chunk(rt, job, index, batch)
        index, total = index + 1, total + len(batch)
    book.set_fields(job.job_id, chunks_sent=index, subjects_listed=total)
    book.set_total(job.job_id, total)
    book.set_fields(job.job_id, listing="done")
    return True


def _revoke_status(rt: Any, job: Any, attempt: int, started: datetime) -> RevokeResult:
    book = rt.book
    final = maybe_finalize_revoke(rt, job.job_id)  # no subjects, or every chunk finished before the total was known
    if final is not None:
        return RevokeResult.model_validate(final)
    p = book.progress(job.job_id)
    return RevokeResult(
        job_id=job.job_id,
        tenant=job.tenant,
        subject=job.subject,
        key_id=job.key_id,
        reason=job.reason,
        status=JobStatus.RUNNING,
        attempts=attempt,
        started_at=started,
        subjects_total=p.total or 0,
        subjects_done=p.succeeded,
        subjects_failed=p.failed,
        new_key_id=job.new_key_id,
    )


@app.task(name=TASK_REVOKE, bind=True)
def revoke(self: Any, *args: Any, continuation: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Start a revocation (``RevokeJob`` JSON) -> ``RevokeResult`` JSON (``running``; the final one is stored in
    Redis by the last re-enrolment chunk). ``continuation``: a key's subject listing handed over to a fresh task."""
    if not isinstance(continuation, int) or continuation < 0:
        kwargs["continuation"] = continuation
        continuation = 0
    return run_job(
        self,
        args,
        kwargs,
        kind="revoke",
        job_type="revoke",
        result_cls=RevokeResult,
        handler=lambda rt, job, attempt, started: _revoke(rt, job, attempt, started, self, continuation),
        ident=lambda j: {"subject": j.subject, "key_id": j.key_id, "reason": j.reason},
        attempt_key=lambda j: j.job_id if continuation == 0 else f"{j.job_id}-c{continuation}",
    )


# --- bulk -----------------------------------------------------------------------------------------------------------
def _lines(body: Any) -> Iterator[str]:
    """A streaming S3 body -> text lines (UTF-8, constant memory). A line longer than ``MAX_MANIFEST_LINE``
    characters is not kept: it comes out as ``TOO_LONG`` (one line), so its row fails alone and the rest go on."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="strict")
    buf = ""
    skipping = False  # inside a line already reported as too long: drop until its end
    for chunk in body.iter_chunks(chunk_size=64 * 1024):
        buf += dec.decode(chunk)
        *lines, buf = buf.split("\n")
        for line in lines:
            if skipping:
                skipping = False
                continue
            yield TOO_LONG if len(line) > MAX_MANIFEST_LINE else line + "\n"
        if len(buf) > MAX_MANIFEST_LINE:
            if not skipping:
                yield TOO_LONG
            skipping, buf = True, ""
    buf += dec.decode(b"", final=True)
    if buf and not skipping:
        yield TOO_LONG if len(buf) > MAX_MANIFEST_LINE else buf


def _jsonl_rows(lines: Iterator[str]) -> Iterator[Any]:
    """One JSONL line at a time, so a bad line is reported and the stream goes on."""
    for n, line in enumerate(lines, start=1):
        if line is TOO_LONG:
            yield ManifestRowError(n, f"line longer than {MAX_MANIFEST_LINE} characters")
            continue
        if not line.strip():
            continue
        try:
            for row in iter_jsonl([line]):
                yield row.model_copy(update={"line": n})
        except ManifestRowError as e:
            yield ManifestRowError(n, str(e).split(": ", 1)[-1])


def _csv_rows(lines: Iterator[str]) -> Iterator[Any]:
    """CSV split into groups of consecutive rows of one subject (the raw lines kept), each group validated by the
    contracts' parser on its own, so a bad row is reported and the stream goes on."""
    import csv

    from worker.contracts import MAX_IMAGES_PER_JOB

    captured: list[str] = []

    def feed() -> Iterator[str]:
        for line in lines:
            if line is TOO_LONG:
                line = "\x00\n"  # csv refuses a NUL: the row becomes a csv.Error, reported below, and parsing goes on
            captured.append(line)
            yield line

    reader = csv.reader(feed())
    try:
        next(reader)
    except StopIteration:
        return
    header = captured[:]
    captured.clear()

    def check(start: int, group: list[str]) -> Iterator[Any]:
        try:
            for row in iter_csv(header + group):
                yield row.model_copy(update={"line": start})
        except ManifestRowError as e:
            yield ManifestRowError(start, str(e).split(": ", 1)[-1])

    group: list[str] = []
    subject: str | None = None
    start = count = 0
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error:  # a field over the csv limit, a NUL (line too long), an unterminated quote...
            captured.clear()
            yield ManifestRowError(reader.line_num, f"not a valid CSV row (or longer than {MAX_MANIFEST_LINE} chars)")
            continue
        raw = captured[:]
        captured.clear()
        if not rec or all(not c.strip() for c in rec):
            continue
        s = rec[0].strip()
        if group and (s != subject or count >= MAX_IMAGES_PER_JOB):
            yield from check(start, group)
            group, count = [], 0
        if not group:
            start, subject = reader.line_num, s
        group.extend(raw)
        count += 1
    if group:
        yield from check(start, group)
    elif not header or not header[0].strip():
        return


def _rows(rt: Any, job: Any) -> Iterator[Any]:
    """Manifest rows, or ``ManifestRowError``s yielded (not raised) so the stream goes on past a bad row."""
    from worker.contracts import S3Prefix, S3Ref

    m = job.manifest
    if m.format == "prefix":
        pre = S3Prefix.model_validate(m.uri)
        keys = (o.key for o in rt.store.list(pre.prefix, bucket=pre.bucket))
        yield from iter_prefix(pre.bucket, pre.prefix, keys, m.rule())
        return
    ref = S3Ref.model_validate(m.uri)
    try:
        body = rt.store.client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"]
    except Exception as e:  # noqa: BLE001 - mapped to ObjectNotFoundError / StorageError
        rt.store._raise(e, "get", ref.bucket, ref.key)
        raise
    if m.format == "csv":
        header_checked = False
        for item in _csv_rows(_lines(body)):
            header_checked = True
            yield item
        del header_checked
    else:
        yield from _jsonl_rows(_lines(body))


def _engine_queue_depth(rt: Any) -> int:
    try:
        return int(rt.redis.llen(ENGINE_QUEUE))
    except Exception:  # noqa: BLE001 - backpressure is best effort
        return 0


def _bulk(rt: Any, job: Any, attempt: int, started: datetime, task: Any, continuation: int) -> BulkResult:
    book = rt.book
    book.open_job(job.job_id, "bulk", tenant=job.tenant, attempts=attempt)
    fields = book.get_fields(job.job_id)
    if fields.get("listing") == "done":
        final = maybe_finalize_bulk(rt, job.job_id)
        return _bulk_status(rt, job, attempt, started, final)
    cursor = book.get_cursor(job.job_id)
    budget = rt.settings.worker.fanout_budget
    t0 = time.monotonic()
    sent = 0
    pending: list[tuple[str, dict[str, Any]]] = []
    bad: dict[str, str] = {}
    row_index = 0

    def flush(upto: int) -> None:
        nonlocal pending, bad, sent
        for cid, payload in pending:
            app.send_task(
                TASK_ENROLL,
                args=[payload],
                kwargs={"parent": job.job_id},
                task_id=cid,
                queue=ENGINE_QUEUE,
                ignore_result=True,
            )
        if bad:
            book.mark_failed(job.job_id, bad)
        n = len(pending) + len(bad)
        sent += len(pending)
        book.set_cursor(job.job_id, upto)
        book.set_fields(job.job_id, enqueued=book.get_cursor(job.job_id), rows_seen=upto)
        pending, bad = [], {}
        del n

    for row in _rows(rt, job):
        row_index += 1
        if row_index <= cursor:
            continue
        if isinstance(row, ManifestRowError):
            bad[child_job_id(job.job_id, "line", row.line)] = "malformed_job"
        else:
            cid = child_job_id(job.job_id, "line", row.line)
            child = EnrollJob(
                job_id=cid,
                tenant=job.tenant,
                subject=row.subject,
                images=list(row.images),
                key_id=row.key_id or job.key_id,
            )
            pending.append((cid, to_wire(child)))
        if len(pending) + len(bad) >= job.chunk_size:
            flush(row_index)
            out_of_time = time.monotonic() - t0 > budget
            deep = _engine_queue_depth(rt) > BULK_MAX_QUEUE_DEPTH_CHUNKS * job.chunk_size
            if out_of_time or deep:
                task.apply_async(
                    args=[to_wire(job)],
                    kwargs={"continuation": continuation + 1},
                    countdown=BULK_PAUSE_S if deep else 0,
                    task_id=f"{job.job_id}-c{continuation + 1}",
                    ignore_result=True,
                )
                log.info(
                    "bulk %s: %d rows sent, continuing in a new task (%s)",
                    job.job_id,
                    row_index,
                    "queue deep" if deep else "time budget",
                )
                return _bulk_status(rt, job, attempt, started, None)
    flush(row_index)
    book.set_total(job.job_id, row_index)
    book.set_fields(job.job_id, listing="done")
    final = maybe_finalize_bulk(rt, job.job_id)
    return _bulk_status(rt, job, attempt, started, final)


def _bulk_status(rt: Any, job: Any, attempt: int, started: datetime, final: dict[str, Any] | None) -> BulkResult:
    if final is not None:
        return BulkResult.model_validate(final)
    p = rt.book.progress(job.job_id)
    f = rt.book.get_fields(job.job_id)
    return BulkResult(
        job_id=job.job_id,
        tenant=job.tenant,
        status=JobStatus.RUNNING,
        attempts=attempt,
        started_at=started,
        total=p.total if f.get("listing") == "done" else None,
        enqueued=int(f.get("enqueued", "0")),
        succeeded=p.succeeded,
        failed=p.failed,
    )


@app.task(name=TASK_BULK, bind=True)
def bulk(self: Any, *args: Any, continuation: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Stream a bulk manifest (``BulkJob`` JSON) into enroll tasks -> ``BulkResult`` JSON (``running`` until every
    enrolment finished; the last one stores the terminal result)."""
    if not isinstance(continuation, int) or continuation < 0:
        kwargs["continuation"] = continuation
        continuation = 0
    return run_job(
        self,
        args,
        kwargs,
        kind="bulk",
        job_type="bulk",
        result_cls=BulkResult,
        handler=lambda rt, job, attempt, started: _bulk(rt, job, attempt, started, self, continuation),
        ident=lambda j: {},
        attempt_key=lambda j: f"{j.job_id}-c{continuation}",
    )


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


def _repair_bulk(rt: Any, parent: str) -> int:
    """Count the finished children a bulk parent missed (a report lost to a Redis outage): every row whose child
    has a stored terminal result but is not counted is reported now. Returns the number repaired."""
    from worker.contracts import EnrollResult
    from worker.tasks.fanout import report_bulk_child

    book = rt.book
    f = book.get_fields(parent)
    total = int(f.get("total") or 0)
    failed = set(book.failures(parent, limit=total + 1))
    repaired = 0
    for line in range(1, total + 1):
        cid = child_job_id(parent, "line", line)
        if cid in failed or book.is_item_done(parent, cid):
            continue
        raw = book.get_result(cid)
        if raw is not None and raw.get("kind") == "enroll":
            report_bulk_child(rt, parent, cid, EnrollResult.model_validate(raw))
            repaired += 1
    return repaired


@app.task(name=TASK_RECONCILE)
def reconcile(limit: int = 1000, idle_s: float = 600.0) -> dict[str, Any]:
    """Periodic repair (Celery beat), safe to run twice:

    - dead letters recorded only in Redis while S3 was down are written to S3;
    - bulk parents idle for ``idle_s`` with their listing done get the children they missed counted (and are
      finalised when that completes them). Results are stored before acks (``common._finish``), so this is the
      belt to those braces.
    """
    from worker.storage.deadletters import write_dead_letter
    from worker.storage.records import DeadLetter
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    book = rt.book
    repaired = 0
    for parent in book.open_jobs(limit):
        f = book.get_fields(parent)
        idle = time.time() - float(f.get("updated") or 0) > idle_s
        if f.get("kind") == "bulk" and f.get("listing") == "done" and idle:
            repaired += _repair_bulk(rt, parent)
    synced = 0
    for job_id in book.dead_letters(limit):
        rec = book.get_dead_letter(job_id)
        if rec is None or rec.get("s3_uri") or not rec.get("tenant"):
            continue  # already in S3, or a poison message (no tenant: Redis only, by hash and size)
        fields = {k: v for k, v in rec.items() if k in DeadLetter.model_fields}
        uri = write_dead_letter(rt.store, DeadLetter.model_validate(fields))
        book.add_dead_letter(job_id, {**rec, "s3_uri": uri})
        synced += 1
    if synced or repaired:
        log.info("reconcile: %d dead letters written to S3, %d bulk children counted", synced, repaired)
    return {"dead_letters_synced": synced, "bulk_children_repaired": repaired}


__all__ = ["bulk", "ping", "reconcile", "revoke", "sweep_staging", "NoTemplateError"]
