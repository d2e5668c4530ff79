"""Control-queue tasks: revocation fan-out and bulk manifest streaming (no models loaded here).

``revoke``: subject -> one re-enrolment chunk; whole key -> mark the key revoked, list the tenant's subjects under
it, send them in chunks of ``worker.revoke_chunk_size`` to the engine queue. The parent returns a ``running``
result; the last chunk writes the terminal one (``worker.service.fanout``).

``bulk``: stream the manifest (constant memory), send one ``enroll`` per subject with a deterministic child job ID,
``chunk_size`` at a time (one Redis round trip per chunk), saving a cursor (rows sent) and a resume point (byte
offset, line count, CSV header length) in Redis after each chunk. A continuation, re-delivered or re-submitted bulk
job starts with a ranged GET at the resume point (its start cost does not depend on how far the stream got) and
skips what is left before the cursor; rows sent twice are harmless (same child job ID -> same result). The task stops
after a time budget or while the engine queue is deep (backpressure) and re-queues itself to continue.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.broker.config import (
    ENGINE_QUEUE,
    TASK_BULK,
    TASK_ENROLL,
    TASK_PING,
    TASK_RECONCILE,
    TASK_REENROLL_CHUNK,
    TASK_REVOKE,
    TASK_SWEEP_STAGING,
)
from worker.broker.publish import MessageTemplate, TemplateMismatch, is_celery_send_task, pipelined, short_argsrepr
from worker.contracts import (
    BulkJob,
    BulkResult,
    EnrollJob,
    JobStatus,
    ManifestRowError,
    ReenrollChunk,
    RevokeJob,
    RevokeResult,
    child_job_id,
    iter_csv,
    iter_jsonl,
    iter_prefix,
    to_wire,
)
from worker.errors import NoTemplateError
from worker.service.clock import now
from worker.service.fanout import maybe_finalize_bulk, maybe_finalize_revoke
from worker.tasks.app import app
from worker.tasks.envelope import Delivery, JobTask

if TYPE_CHECKING:
    from worker.service.runtime import Runtime

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
        return _revoke(rt, job, attempt, started, self, delivery.continuation)

    def ident(self, job: RevokeJob) -> dict[str, Any]:
        return {"subject": job.subject, "key_id": job.key_id, "reason": job.reason}

    def attempt_key(self, job: RevokeJob, delivery: Delivery) -> str:
        return job.job_id if delivery.continuation == 0 else f"{job.job_id}-c{delivery.continuation}"


revoke = app.register_task(RevokeTask())


# --- bulk -----------------------------------------------------------------------------------------------------------
MAX_LINE_BYTES = 4 * MAX_MANIFEST_LINE  # a partial line longer than this has more than MAX_MANIFEST_LINE characters


@dataclass(frozen=True)
class _Resume:
    """Where a continuation starts reading: after item ``index`` (rows and row errors, counted like the cursor),
    at byte ``offset`` of the manifest object, ``lines`` physical lines in; ``header_bytes`` (CSV) is the length of
    the header, read again with a ranged GET."""

    index: int
    offset: int
    lines: int
    header_bytes: int = 0

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> _Resume | None:
        if "resume_offset" not in fields:  # a cursor saved before byte offsets were (or a prefix manifest)
            return None
        return cls(
            int(fields["resume_index"]),
            int(fields["resume_offset"]),
            int(fields["resume_lines"]),
            int(fields.get("header_bytes", "0")),
        )


def _lines(body: Any, start: int = 0) -> Iterator[tuple[str, int]]:
    """A streaming S3 body that starts at byte ``start`` of the object -> (text line, byte offset just after it),
    UTF-8, constant memory. A line longer than ``MAX_MANIFEST_LINE`` characters is not kept: it comes out as
    ``TOO_LONG`` (one line), so its row fails alone and the rest go on. Lines are split on the bytes (a ``\\n`` byte
    never occurs inside a multi-byte UTF-8 character), so every line's end offset is exact."""
    buf = b""
    pos = start  # object offset of buf[0]
    skipping = False  # inside a line already known to be too long: drop it until its end
    for chunk in body.iter_chunks(chunk_size=256 * 1024):
        buf += chunk
        parts = buf.split(b"\n")
        buf = parts.pop()
        for raw in parts:
            pos += len(raw) + 1
            if skipping:
                skipping = False
                yield TOO_LONG, pos
            else:
                yield _line_text(raw, "\n"), pos
        if len(buf) > MAX_LINE_BYTES:
            skipping, pos, buf = True, pos + len(buf), b""
    if skipping:
        yield TOO_LONG, pos + len(buf)
    elif buf:
        yield _line_text(buf, ""), pos + len(buf)


def _line_text(raw: bytes, end: str) -> str:
    if len(raw) > MAX_MANIFEST_LINE:
        text = raw.decode("utf-8")
        return TOO_LONG if len(text) > MAX_MANIFEST_LINE else text + end
    return raw.decode("utf-8") + end


_State = tuple[int, int] | None  # (byte offset, physical lines) to resume after an item; None: not a safe point


def _jsonl_rows(lines: Iterator[tuple[str, int]], line0: int = 0) -> Iterator[tuple[Any, _State]]:
    """One JSONL line at a time, so a bad line is reported and the stream goes on."""
    for n, (line, end) in enumerate(lines, start=line0 + 1):
        if line is TOO_LONG:
            yield ManifestRowError(n, f"line longer than {MAX_MANIFEST_LINE} characters"), (end, n)
            continue
        if not line.strip():
            continue
        try:
            rows = [row.model_copy(update={"line": n}) for row in iter_jsonl([line])]
        except ManifestRowError as e:
            yield ManifestRowError(n, str(e).split(": ", 1)[-1]), (end, n)
            continue
        for i, row in enumerate(rows, start=1):
            yield row, ((end, n) if i == len(rows) else None)


def _csv_rows(
    lines: Iterator[tuple[str, int]],
    start: int = 0,
    line0: int = 0,
    header: list[str] | None = None,
    info: dict[str, int] | None = None,
) -> Iterator[tuple[Any, _State]]:
    """CSV split into groups of consecutive rows of one subject (the raw lines kept), each group validated by the
    contracts' parser on its own, so a bad row is reported and the stream goes on.

    From the object's start (``header`` None) the header is the first record and its length in bytes goes to
    ``info["header_bytes"]``. A continuation passes the header's lines and the stream from byte ``start``, which is
    ``line0`` physical lines in, so line numbers (and child job IDs) are those of a read from the start. An item's
    state is where the record after it begins: a group is known to be complete only when the next subject's first
    record has been read, and a continuation starting there reads that record again."""
    import csv

    from worker.contracts import MAX_IMAGES_PER_JOB

    captured: list[str] = []
    fed = [start, line0]  # object offset after the last stream line fed to the reader, stream lines fed so far

    def feed() -> Iterator[str]:
        for line in header or ():
            captured.append(line)
            yield line
        for line, end in lines:
            if line is TOO_LONG:
                line = "\x00\n"  # csv refuses a NUL: the row becomes a csv.Error, reported below, and parsing goes on
            captured.append(line)
            fed[0], fed[1] = end, fed[1] + 1
            yield line

    reader = csv.reader(feed())
    try:
        next(reader)
    except StopIteration:
        return
    head = captured[:]
    captured.clear()
    delta = 0 if header is None else line0 - len(head)  # reader.line_num + delta = line number in the object
    if header is None and info is not None:
        info["header_bytes"] = fed[0]

    def check(first: int, group: list[str], state: _State) -> Iterator[tuple[Any, _State]]:
        try:
            rows = [row.model_copy(update={"line": first}) for row in iter_csv(head + group)]
        except ManifestRowError as e:
            yield ManifestRowError(first, str(e).split(": ", 1)[-1]), state
            return
        for i, row in enumerate(rows, start=1):
            yield row, (state if i == len(rows) else None)

    group: list[str] = []
    subject: str | None = None
    first = count = 0
    while True:
        before: _State = (fed[0], fed[1])
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error:  # a field over the csv limit, a NUL (line too long), an unterminated quote...
            captured.clear()
            err = ManifestRowError(
                reader.line_num + delta, f"not a valid CSV row (or longer than {MAX_MANIFEST_LINE} chars)"
            )
            yield err, (None if group else (fed[0], fed[1]))  # reported before the pending group: not a safe point
            continue
        raw = captured[:]
        captured.clear()
        if not rec or all(not c.strip() for c in rec):
            continue
        s = rec[0].strip()
        if group and (s != subject or count >= MAX_IMAGES_PER_JOB):
            yield from check(first, group, before)
            group, count = [], 0
        if not group:
            first, subject = reader.line_num + delta, s
        group.extend(raw)
        count += 1
    if group:
        yield from check(first, group, (fed[0], fed[1]))


def _get_body(rt: Any, bucket: str, key: str, first: int = 0, last: int | None = None) -> Any:
    """The object's streaming body from byte ``first`` (ranged GET), or None when ``first`` is past its end."""
    kw: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if first or last is not None:
        kw["Range"] = f"bytes={first}-{'' if last is None else last}"
    try:
        return rt.store.client.get_object(**kw)["Body"]
    except Exception as e:  # noqa: BLE001 - mapped to ObjectNotFoundError / StorageError
        code = getattr(e, "response", {}).get("Error", {}).get("Code")
        if first and code == "InvalidRange":  # the previous task stopped at the very end
            return None
        rt.store._raise(e, "get", bucket, key)
        raise


def _rows(rt: Any, job: Any, resume: _Resume | None = None, info: dict[str, int] | None = None) -> Iterator[Any]:
    """(manifest row or ``ManifestRowError``, resume state) from the start, or from ``resume`` (a ranged GET from
    its byte offset: nothing before it is read again). Errors are yielded, not raised, so the stream goes on past a
    bad row. Prefix manifests have no byte offsets (state None)."""
    from worker.contracts import S3Prefix, S3Ref

    m = job.manifest
    if m.format == "prefix":
        pre = S3Prefix.model_validate(m.uri)
        keys = (o.key for o in rt.store.list(pre.prefix, bucket=pre.bucket))
        for item in iter_prefix(pre.bucket, pre.prefix, keys, m.rule()):
            yield item, None
        return
    ref = S3Ref.model_validate(m.uri)
    start, line0 = (resume.offset, resume.lines) if resume is not None else (0, 0)
    body = _get_body(rt, ref.bucket, ref.key, start)
    lines: Iterator[tuple[str, int]] = iter(()) if body is None else _lines(body, start)
    if m.format == "csv":
        header = None
        if resume is not None:
            hb = _get_body(rt, ref.bucket, ref.key, 0, resume.header_bytes - 1) if resume.header_bytes else None
            header = [] if hb is None else [line for line, _ in _lines(hb)]
        yield from _csv_rows(lines, start, line0, header, info)
    else:
        yield from _jsonl_rows(lines, line0)


def _engine_queue_depth(rt: Any) -> int:
    try:
        return int(rt.redis.llen(ENGINE_QUEUE))
    except Exception:  # noqa: BLE001 - backpressure is best effort
        return 0


class _ChildSender:
    """Sends a bulk job's enrol children, one Redis round trip per chunk: pre-rendered list items
    (``MessageTemplate``, built once per task from a message Celery itself produced) in one ``LPUSH``, or, when that is
    refused (``send_task`` wrapped, envelope changed), ``send_task`` per child inside one publish batch."""

    def __init__(self, parent_id: str) -> None:
        self.parent_id = parent_id
        self.template: MessageTemplate | None = None
        self.refused = False

    def send(self, pending: list[tuple[str, dict[str, Any]]]) -> None:
        if not pending:
            return
        if self.template is None and not self.refused:
            cid, payload = pending[0]
            try:
                self.template = MessageTemplate(
                    app,
                    TASK_ENROLL,
                    ENGINE_QUEUE,
                    cid,
                    [payload],
                    short_argsrepr("enroll", cid),
                    kwargs={"parent": self.parent_id},
                )
            except TemplateMismatch as e:
                self.refused = True
                if is_celery_send_task(app):
                    log.warning("bulk: message template refused (%s); sending with send_task", e)
        tpl = self.template
        if tpl is not None:
            items = [tpl.render(cid, [payload], short_argsrepr("enroll", cid)) for cid, payload in pending]
            with app.producer_or_acquire() as producer, producer.channel.conn_or_acquire() as client:
                client.lpush(tpl.key, *items)
            return
        with pipelined(app, max(len(pending), 1)) as producer:
            for i, (cid, payload) in enumerate(pending):
                app.send_task(
                    TASK_ENROLL,
                    args=[payload],
                    kwargs={"parent": self.parent_id},
                    task_id=cid,
                    queue=ENGINE_QUEUE,
                    ignore_result=True,
                    argsrepr=short_argsrepr("enroll", cid),
                    producer=producer,
                    retry=False,
                    **({} if i == 0 else {"declare": []}),  # the engine queue is declared (bound) once per chunk
                )


def _bulk(rt: Any, job: Any, attempt: int, started: datetime, task: Any, continuation: int) -> BulkResult:
    book = rt.book
    book.open_job(job.job_id, "bulk", tenant=job.tenant, attempts=attempt)
    fields = book.get_fields(job.job_id)
    if fields.get("listing") == "done":
        final = maybe_finalize_bulk(rt, job.job_id)
        return _bulk_status(rt, job, attempt, started, final)
    cursor = int(fields.get("cursor", "0"))
    resume = _Resume.from_fields(fields)
    if resume is not None and resume.index > cursor:
        resume = None  # cannot happen (both move together); re-read from the start rather than skip rows
    info = {"header_bytes": resume.header_bytes if resume is not None else 0}
    budget = rt.settings.worker.fanout_budget
    t0 = time.monotonic()
    pending: list[tuple[str, dict[str, Any]]] = []
    bad: dict[str, str] = {}
    row_index = resume.index if resume is not None else 0
    safe: _Resume | None = resume
    sender = _ChildSender(job.job_id)

    def flush(upto: int) -> None:
        nonlocal pending, bad
        sender.send(pending)
        if bad:
            book.mark_failed(job.job_id, bad)
        book.advance_bulk(
            job.job_id,
            upto,
            None if safe is None else (safe.index, safe.offset, safe.lines, safe.header_bytes),
        )
        pending, bad = [], {}

    last_line = 0
    for row, state in _rows(rt, job, resume, info):
        row_index += 1
        last_line = row.line
        if state is not None:
            safe = _Resume(row_index, state[0], state[1], info["header_bytes"])
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
    # the highest line a child ID can name (CSV groups several lines per child): the reconciler walks up to it
    last_line = max(last_line, int(book.get_fields(job.job_id).get("last_line") or 0))
    book.set_fields(job.job_id, listing="done", last_line=last_line)
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
        return _bulk(rt, job, attempt, started, self, delivery.continuation)

    def attempt_key(self, job: BulkJob, delivery: Delivery) -> str:
        return f"{job.job_id}-c{delivery.continuation}"


bulk = app.register_task(BulkTask())


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
    from worker.service.fanout import report_bulk_child

    book = rt.book
    f = book.get_fields(parent)
    last_line = int(f.get("last_line") or f.get("total") or 0)
    repaired = 0
    for start in range(1, last_line + 1, 1000):  # one pipelined round trip per 1,000 lines
        ids = [child_job_id(parent, "line", n) for n in range(start, min(start + 1000, last_line + 1))]
        for cid, raw in book.unreported_children(parent, ids):
            if raw.get("kind") == "enroll":
                report_bulk_child(rt, parent, cid, EnrollResult.model_validate(raw))
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
