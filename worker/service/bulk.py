"""Bulk enrolment, outside Celery: the parent job of a bulk manifest (``bulk``).

Stream the manifest (constant memory), send one enrol job per subject with a deterministic child job ID,
``chunk_size`` at a time (one round trip per chunk through the ``Dispatch``), saving a cursor (rows sent) and a
resume point (byte offset, line count, CSV header length) in the job book after each chunk. A continuation,
re-delivered or re-submitted bulk job starts with a ranged GET at the resume point (its start cost does not depend
on how far the stream got) and skips what is left before the cursor; rows sent twice are harmless (same child job ID
-> same result). The job stops after a time budget or while the engine queue is deep (backpressure) and hands over
to a continuation. A bad row fails alone (``malformed_job``); the children report to the parent's counters and the
last one writes the ``BulkResult`` (``worker.service.fanout``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.contracts import (
    BulkJob,
    BulkResult,
    EnrollJob,
    JobStatus,
    ManifestRowError,
    S3Prefix,
    S3Ref,
    child_job_id,
    iter_csv,
    iter_jsonl,
    iter_prefix,
    to_wire,
)
from worker.service.fanout import maybe_finalize_bulk

if TYPE_CHECKING:
    from worker.service.runtime import Dispatch, Runtime

log = logging.getLogger(__name__)

BULK_MAX_QUEUE_DEPTH_CHUNKS = 8  # backpressure: pause while the engine queue holds more than this many chunks
BULK_PAUSE_S = 5.0
MAX_MANIFEST_LINE = 64 * 1024  # characters; a row of 32 image refs of 1 KiB fits twice
TOO_LONG = "<line too long>\n"  # the sentinel _lines yields (compared by identity)
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


def _get_body(rt: Runtime, bucket: str, key: str, first: int = 0, last: int | None = None) -> Any:
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


def _rows(
    rt: Runtime, job: BulkJob, resume: _Resume | None = None, info: dict[str, int] | None = None
) -> Iterator[tuple[Any, _State]]:
    """(manifest row or ``ManifestRowError``, resume state) from the start, or from ``resume`` (a ranged GET from
    its byte offset: nothing before it is read again). Errors are yielded, not raised, so the stream goes on past a
    bad row. Prefix manifests have no byte offsets (state None)."""
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


def bulk(
    rt: Runtime, job: BulkJob, attempt: int, started: datetime, dispatch: Dispatch, continuation: int
) -> BulkResult:
    """Stream the manifest from the saved cursor, sending a chunk of enrol children at a time; hand over to a
    continuation after the time budget or while the engine queue is deep (see the module docstring)."""
    book = rt.book
    book.open_job(job.ref, "bulk", tenant=job.tenant, attempts=attempt)
    fields = book.get_fields(job.ref)
    if fields.get("listing") == "done":
        final = maybe_finalize_bulk(rt, job.tenant, job.job_id)
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

    def flush(upto: int) -> None:
        nonlocal pending, bad
        dispatch.send_enrolls(pending)
        if bad:
            book.mark_failed(job.ref, bad)
        book.advance_bulk(
            job.ref,
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
            deep = dispatch.engine_queue_depth() > BULK_MAX_QUEUE_DEPTH_CHUNKS * job.chunk_size
            if out_of_time or deep:
                dispatch.continue_job(job, continuation + 1, countdown=BULK_PAUSE_S if deep else 0)
                log.info(
                    "bulk %s: %d rows sent, continuing in a new task (%s)",
                    job.job_id,
                    row_index,
                    "queue deep" if deep else "time budget",
                )
                return _bulk_status(rt, job, attempt, started, None)
    flush(row_index)
    book.set_total(job.ref, row_index)
    # the highest line a child ID can name (CSV groups several lines per child): the reconciler walks up to it
    last_line = max(last_line, int(book.get_fields(job.ref).get("last_line") or 0))
    book.set_fields(job.ref, listing="done", last_line=last_line)
    final = maybe_finalize_bulk(rt, job.tenant, job.job_id)
    return _bulk_status(rt, job, attempt, started, final)


def _bulk_status(
    rt: Runtime, job: BulkJob, attempt: int, started: datetime, final: dict[str, Any] | None
) -> BulkResult:
    if final is not None:
        return BulkResult.model_validate(final)
    p = rt.book.progress(job.ref)
    f = rt.book.get_fields(job.ref)
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
