"""Bulk enrolment, outside Celery: the parent job of a bulk manifest (``bulk``).

Stream the manifest (constant memory), send one enrol job per subject with a deterministic child job ID,
``chunk_size`` at a time (one round trip per chunk through the ``Dispatch``), saving a cursor (rows sent) and a
resume point (byte offset, line count, CSV header length) in the job book after each chunk. A continuation,
re-delivered or re-submitted bulk job starts with a ranged GET at the resume point (its start cost does not depend
on how far the stream got) and skips what is left before the cursor; rows sent twice are harmless (same child job ID
-> same result). The job stops after a time budget or while the engine queue is deep (backpressure) and hands over
to a continuation. The manifest must lie where the tenant may read images (checked before any S3 request). A bad
row fails alone (``malformed_job``, with its line, subject and reason kept for the report); a subject listed again
after other subjects is refused at its later lines (the first line of each subject is claimed in the job book). The
children report to the parent's counters and the last one writes the ``BulkResult`` and the report of failed rows
(``worker.service.fanout``, ``worker.service.bulk_report``).
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
    to_wire,
)
from worker.contracts.manifest import State, csv_items, jsonl_items, not_consecutive, prefix_items, split_lines
from worker.errors import MalformedJobError
from worker.service.fanout import maybe_finalize_bulk

if TYPE_CHECKING:
    from worker.service.runtime import Dispatch, Runtime

log = logging.getLogger(__name__)

BULK_MAX_QUEUE_DEPTH_CHUNKS = 8  # backpressure: pause while the engine queue holds more than this many chunks
BULK_PAUSE_S = 5.0
MESSAGE_CHARS = 500  # a row error's message in the job book and the report


@dataclass(frozen=True)
class _Resume:
    """Where a continuation starts reading: after item ``index`` (rows and row errors, counted like the cursor),
    at byte ``offset`` of the manifest object, ``lines`` physical lines in; ``header_bytes`` (CSV) is the length of
    the header, read again with a ranged GET. A prefix manifest resumes by listing after ``after_key`` (its
    ``lines``-th object)."""

    index: int
    offset: int
    lines: int
    header_bytes: int = 0
    after_key: str = ""

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> _Resume | None:
        if "resume_offset" not in fields:  # a cursor saved before byte offsets were (or a prefix manifest)
            return None
        return cls(
            int(fields["resume_index"]),
            int(fields["resume_offset"]),
            int(fields["resume_lines"]),
            int(fields.get("header_bytes", "0")),
            fields.get("resume_key", ""),
        )


def check_manifest_location(rt: Runtime, job: BulkJob) -> None:
    """The manifest (a CSV/JSONL object, or a prefix manifest's whole prefix) must lie where the tenant may read
    source images (``worker.contracts.inputs.InputPolicy``: its input prefix or its allow-list, never the output
    bucket). Raises ``ForbiddenInputError`` before any S3 request, so a refusal reveals nothing about what exists."""
    from worker.contracts.inputs import InputPolicy

    m = job.manifest
    where = S3Prefix.model_validate(m.uri) if m.format == "prefix" else S3Ref.model_validate(m.uri)
    InputPolicy.from_settings(rt.settings.s3).check(job.tenant, where)


def _get_body(rt: Runtime, bucket: str, key: str, first: int = 0, last: int | None = None) -> Any:
    """The object's streaming body from byte ``first`` (ranged GET), or None when ``first`` is past its end."""
    kw: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if first or last is not None:
        kw["Range"] = f"bytes={first}-{'' if last is None else last}"
    try:
        return rt.store.client.get_object(**kw)["Body"]
    except Exception as e:  # mapped to ObjectNotFoundError / StorageError
        code = getattr(e, "response", {}).get("Error", {}).get("Code")
        if first and code == "InvalidRange":  # the previous task stopped at the very end
            return None
        rt.store._raise(e, "get", bucket, key)
        raise


def _rows(
    rt: Runtime, job: BulkJob, resume: _Resume | None = None, info: dict[str, int] | None = None
) -> Iterator[tuple[Any, tuple[int, int, str] | None]]:
    """(manifest row, ``ManifestRowError`` or None; resume state) from the start, or from ``resume`` (a ranged GET
    from its byte offset, or a listing after its key: nothing before it is read again). Errors are yielded, not
    raised, so the stream goes on past a bad row (``worker.contracts.manifest``). A state is (byte offset, lines,
    last key listed); None items (prefix listings only) are places to stop where no row was found."""
    m = job.manifest
    if m.format == "prefix":
        pre = S3Prefix.model_validate(m.uri)
        line0, after = (resume.lines, resume.after_key) if resume is not None and resume.after_key else (0, None)
        keys = (o.key for o in rt.store.list(pre.prefix, bucket=pre.bucket, start_after=after))
        for item, st in prefix_items(pre.bucket, pre.prefix, keys, m.rule(), line0):
            yield item, (None if st is None else (0, st[0], st[1]))
        return
    ref = S3Ref.model_validate(m.uri)
    start, line0 = (resume.offset, resume.lines) if resume is not None else (0, 0)
    body = _get_body(rt, ref.bucket, ref.key, start)
    lines: Iterator[tuple[str, int]] = iter(()) if body is None else split_lines(_chunks(body), start)
    items: Iterator[tuple[Any, State]]
    if m.format == "csv":
        header = None
        if resume is not None:
            hb = _get_body(rt, ref.bucket, ref.key, 0, resume.header_bytes - 1) if resume.header_bytes else None
            header = next((line for line, _ in split_lines(_chunks(hb))), "") if hb is not None else ""
        items = csv_items(lines, start, line0, header, info)
    else:
        items = jsonl_items(lines, line0)
    for item, state in items:
        yield item, (None if state is None else (state[0], state[1], ""))


def _chunks(body: Any) -> Iterator[bytes]:
    return iter(body.iter_chunks(chunk_size=256 * 1024))


def _error_info(e: ManifestRowError) -> dict[str, Any]:
    return {"line": e.line, "subject": e.subject, "code": e.code, "message": e.reason[:MESSAGE_CHARS]}


def _queue_deep(dispatch: Dispatch, job: BulkJob) -> bool:
    """Backpressure: the engine queue holds more than ``BULK_MAX_QUEUE_DEPTH_CHUNKS`` of this job's chunks."""
    return dispatch.engine_queue_depth() > BULK_MAX_QUEUE_DEPTH_CHUNKS * job.chunk_size


def bulk(
    rt: Runtime, job: BulkJob, attempt: int, started: datetime, dispatch: Dispatch, continuation: int
) -> BulkResult:
    """Stream the manifest from the saved cursor, sending a chunk of enrol children at a time; hand over to a
    continuation after the time budget or while the engine queue is deep (see the module docstring)."""
    check_manifest_location(rt, job)  # before anything is read, listed or recorded
    book = rt.book
    book.open_job(job.ref, "bulk", tenant=job.tenant, attempts=attempt)
    fields = book.get_fields(job.ref)
    if fields.get("listing") == "done":
        final = maybe_finalize_bulk(rt, job.tenant, job.job_id)
        return _bulk_status(rt, job, attempt, started, final)
    if continuation > 0 and _queue_deep(dispatch, job):
        # a continuation after a pause sends nothing while the queue is still deep: it waits again
        dispatch.continue_job(job, continuation + 1, countdown=BULK_PAUSE_S)
        return _bulk_status(rt, job, attempt, started, None)
    cursor = int(fields.get("cursor", "0"))
    resume = _Resume.from_fields(fields)
    if resume is not None and resume.index > cursor:
        resume = None  # cannot happen (both move together); re-read from the start rather than skip rows
    info = {"header_bytes": resume.header_bytes if resume is not None else 0}
    budget = rt.settings.worker.fanout_budget
    t0 = time.monotonic()
    pending: list[tuple[str, EnrollJob]] = []
    bad: dict[str, dict[str, Any]] = {}
    row_index = resume.index if resume is not None else 0
    safe: _Resume | None = resume

    def flush(upto: int) -> None:
        nonlocal pending, bad
        # a subject listed again after other subjects is refused, never a second enrolment replacing the first: the
        # first line of each subject is claimed in the job book (idempotent: a re-sent row claims its own line)
        firsts = book.claim_subjects(job.ref, [(child.subject, line_of[cid]) for cid, child in pending])
        send = []
        for (cid, child), first in zip(pending, firsts, strict=True):
            if first == line_of[cid]:
                send.append((cid, to_wire(child)))
            else:
                bad[cid] = _error_info(not_consecutive(line_of[cid], child.subject, first))
        dispatch.send_enrolls(send)
        if bad:
            book.mark_failed_rows(job.ref, bad)
        book.advance_bulk(
            job.ref,
            upto,
            None if safe is None else (safe.index, safe.offset, safe.lines, safe.header_bytes),
            "" if safe is None else safe.after_key,
        )
        pending, bad = [], {}
        line_of.clear()

    line_of: dict[str, int] = {}
    last_line = 0
    try:
        for row, state in _rows(rt, job, resume, info):
            if row is None:  # a long prefix listing with nothing to send: stop here if the time is up
                if state is not None:
                    safe = _Resume(row_index, state[0], state[1], 0, state[2])
                if time.monotonic() - t0 > budget and safe is not None and safe.index >= cursor:
                    flush(max(row_index, cursor))
                    dispatch.continue_job(job, continuation + 1, countdown=0)
                    log.info("bulk %s: %d objects listed, continuing in a new task", job.job_id, safe.lines)
                    return _bulk_status(rt, job, attempt, started, None)
                continue
            row_index += 1
            last_line = max(last_line, row.line)
            if state is not None:
                safe = _Resume(row_index, state[0], state[1], info["header_bytes"], state[2])
            if row_index <= cursor:
                continue
            cid = child_job_id(job.job_id, "line", row.line)
            if isinstance(row, ManifestRowError):
                bad[cid] = _error_info(row)
            else:
                line_of[cid] = row.line
                child = EnrollJob(
                    job_id=cid,
                    tenant=job.tenant,
                    subject=row.subject,
                    images=list(row.images),
                    key_id=row.key_id or job.key_id,
                )
                pending.append((cid, child))
            if len(pending) + len(bad) >= job.chunk_size:
                flush(row_index)
                out_of_time = time.monotonic() - t0 > budget
                deep = _queue_deep(dispatch, job)
                if out_of_time or deep:
                    dispatch.continue_job(job, continuation + 1, countdown=BULK_PAUSE_S if deep else 0)
                    log.info(
                        "bulk %s: %d rows sent, continuing in a new task (%s)",
                        job.job_id,
                        row_index,
                        "queue deep" if deep else "time budget",
                    )
                    return _bulk_status(rt, job, attempt, started, None)
    except MalformedJobError:  # the CSV header: the whole manifest is refused
        book.close_job(job.ref, JobStatus.FAILED.value)
        raise
    flush(row_index)
    book.set_total(job.ref, row_index)
    # the highest line a child ID can name (CSV groups several lines per child): the reconciler walks up to it
    last_line = max(last_line, int(book.get_fields(job.ref).get("last_line") or 0))
    book.set_fields(job.ref, listing="done", last_line=last_line)
    book.forget_subjects(job.ref)
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
