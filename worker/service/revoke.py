"""Revocation, outside Celery: the parent job of a revocation (``revoke``).

Subject: check that a current version exists (else ``no_template``) and send one re-enrolment chunk. Whole key:
refuse a key the key provider does not know and the tenant never used (``unknown_key``, nothing written), mark the
key revoked for the tenant, list the tenant's subjects under it and send those with a committed version in chunks of
``worker.revoke_chunk_size``; a subject under the key with no committed version yet (its first enrolment may be in
flight) is fenced instead (``_fence_first_enrollment``): nothing under the revoked key can become current after the
listing. After the fan-out time budget the listing hands over to a continuation, which resumes
from the saved cursor. Chunk payloads are saved in the job book, so a re-delivered parent re-sends the same chunks.
The parent returns a ``running`` result; the last chunk writes the terminal one (``worker.service.fanout``).
Messages go out through a ``Dispatch`` (``worker.service.runtime``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from worker.contracts import JobStatus, ReenrollChunk, RevokeJob, RevokeResult, child_job_id
from worker.errors import RevokedKeyError, UnknownKeyError
from worker.keys.registry import KeyRegistry
from worker.service.fanout import maybe_finalize_revoke
from worker.storage import layout
from worker.storage.keyindex import COMMITTED_UNDER, UNCOMMITTED_UNDER, KeyIndex, subjects_under_key
from worker.storage.templates import TemplateStore

if TYPE_CHECKING:
    from worker.service.runtime import Dispatch, Runtime

log = logging.getLogger(__name__)

REVOKE_READ_THREADS = 16  # concurrent per-subject S3 reads while listing a revoked key's subjects
REVOKE_PAUSE_S = 5.0


def _send_chunk(rt: Runtime, job: RevokeJob, dispatch: Dispatch, index: int, subjects: list[str]) -> None:
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
    rt.book.push_chunk(job.ref, index, payload)
    dispatch.send_chunk(payload)


def _subjects_under_key(
    rt: Runtime, job: RevokeJob, start_after: str | None, use_index: bool
) -> Iterator[tuple[str, str | None]]:
    """(subject, standing under the revoked key: ``COMMITTED_UNDER``, ``UNCOMMITTED_UNDER`` or None) in listing
    order after ``start_after``: from the key's subject index where it is complete, else every subject's records
    (``worker.storage.keyindex``; reads ``REVOKE_READ_THREADS`` at a time)."""
    assert job.key_id is not None
    return subjects_under_key(
        rt.store, job.tenant, job.key_id, job.job_id, start_after, use_index=use_index, threads=REVOKE_READ_THREADS
    )


def revoke(
    rt: Runtime, job: RevokeJob, attempt: int, started: datetime, dispatch: Dispatch, continuation: int
) -> RevokeResult:
    """Start (or, re-delivered or continued, carry on) a revocation; returns the ``running`` result unless the
    revocation already finished (see the module docstring)."""
    book = rt.book
    fields: dict[str, str | int] = {
        "tenant": job.tenant,
        "reason": job.reason,
        "attempts": attempt,
        "subject": job.subject or "",
        "key_id": job.key_id or "",
        "new_key_id": job.new_key_id or "",
    }
    if job.new_key_id is not None:
        rt.keys.check_usable(job.tenant, job.new_key_id)  # unknown / revoked replacement: fail before any change
    if job.key_id is not None:
        check_revocable_key(rt, job.tenant, job.key_id)  # unknown key: fail before any change
    if job.subject is not None:
        TemplateStore(rt.store).current(job.tenant, job.subject)  # NoTemplateError before any state change
    book.open_job(job.ref, "revoke", **fields)
    if book.get_fields(job.ref).get("listing") == "done":
        for i, payload in enumerate(book.chunks(job.ref)):  # re-delivered parent: re-send, chunks are idempotent
            dispatch.send_chunk(payload)
            log.debug("re-sent chunk %d of %s", i, job.job_id)
    elif job.subject is not None:
        book.set_total(job.ref, 1)
        _send_chunk(rt, job, dispatch, 0, [job.subject])
        book.set_fields(job.ref, listing="done")
    else:
        if job.key_id is None:  # cannot happen: the contracts require a subject or a key
            raise ValueError("a revocation names a subject or a key")
        KeyRegistry(rt.store).revoke_key(job.tenant, job.key_id, reason=job.reason, job_id=job.job_id)
        if not _list_key_subjects(rt, job, dispatch, continuation):
            return _revoke_status(rt, job, attempt, started)  # handed over to a continuation
    return _revoke_status(rt, job, attempt, started)


def _list_key_subjects(rt: Runtime, job: RevokeJob, dispatch: Dispatch, continuation: int) -> bool:
    """Send the subjects under the revoked key in chunks, from the saved cursor (the last subject listed). After a
    time budget, or while more than ``worker.revoke_max_queued_chunks`` of its chunks are unfinished (backpressure:
    a large revocation never floods the engine queues), save the cursor and re-queue the task as a continuation
    (returns False; after ``REVOKE_PAUSE_S`` when paused); True when the listing is complete. A re-delivered
    continuation re-sends at most one chunk, under the same chunk ID (idempotent)."""
    book = rt.book
    fields = book.get_fields(job.ref)
    cursor = fields.get("listing_cursor") or None
    index, total = int(fields.get("chunks_sent", "0")), int(fields.get("subjects_listed", "0"))
    mode = fields.get("listing_mode") or ("scan" if cursor else None)  # a cursor is valid in its own mode only
    if mode is None:
        assert job.key_id is not None
        mode = "index" if KeyIndex(rt.store).is_complete(job.tenant, job.key_id) else "scan"
        book.set_fields(job.ref, listing_mode=mode)
    fenced = int(fields.get("subjects_fenced", "0"))
    size = rt.settings.worker.revoke_chunk_size
    budget = rt.settings.worker.fanout_budget
    window = rt.settings.worker.revoke_max_queued_chunks * size
    if _unfinished(rt, job, total) > window:  # still paused: list nothing more yet
        dispatch.continue_job(job, continuation + 1, countdown=REVOKE_PAUSE_S)
        return False
    t0 = time.monotonic()
    batch: list[str] = []
    last = cursor
    for subject, standing in _subjects_under_key(rt, job, cursor, mode == "index"):
        last = subject
        if standing == UNCOMMITTED_UNDER:
            standing = COMMITTED_UNDER if _fence_first_enrollment(rt, job, subject) else None
            fenced += int(standing is None)
        if standing == COMMITTED_UNDER:
            batch.append(subject)
        if len(batch) >= size:
            _send_chunk(rt, job, dispatch, index, batch)
            index, total, batch = index + 1, total + len(batch), []
            book.set_fields(
                job.ref, listing_cursor=last or "", chunks_sent=index, subjects_listed=total, subjects_fenced=fenced
            )
            out_of_time = time.monotonic() - t0 > budget
            deep = _unfinished(rt, job, total) > window
            if out_of_time or deep:
                dispatch.continue_job(job, continuation + 1, countdown=REVOKE_PAUSE_S if deep else None)
                log.info(
                    "revoke %s: %d subjects listed, continuing in a new task (%s)",
                    job.job_id,
                    total,
                    "chunks queued" if deep else "time budget",
                )
                return False
    if batch:
        _send_chunk(rt, job, dispatch, index, batch)
        index, total = index + 1, total + len(batch)
    book.set_fields(job.ref, chunks_sent=index, subjects_listed=total, subjects_fenced=fenced)
    book.set_total(job.ref, total)
    book.set_fields(job.ref, listing="done")
    return True


def _unfinished(rt: Runtime, job: RevokeJob, listed: int) -> int:
    """Subjects sent in chunks that have not finished yet (succeeded or failed)."""
    p = rt.book.progress(job.ref)
    return listed - (p.succeeded + p.failed)


def check_revocable_key(rt: Runtime, tenant: str, key_id: str) -> None:
    """``UnknownKeyError`` unless the key provider knows ``key_id`` (a key disabled there counts: revoking it is what
    it is for) or the tenant's key index lists a subject under it (key material retired from the keyring before its
    subjects were moved off it). Writes nothing."""
    try:
        if rt.keys.has_key(key_id):
            return
    except RevokedKeyError:
        return
    if next(iter(rt.store.list(layout.key_index_prefix(tenant, key_id))), None) is not None:
        return
    raise UnknownKeyError(f"key {key_id} is not known to the key provider nor used by tenant {tenant}; nothing changed")


def _fence_first_enrollment(rt: Runtime, job: RevokeJob, subject: str) -> bool:
    """A subject under the revoked key with no committed version: its first enrolment may be in flight. Move its
    key record to the new key (``bump_subject_key``, idempotent per job) and write a fence-only pointer at the new
    epoch (``TemplateStore.raise_fence``), so that an enrolment derived under the revoked key can never commit a
    current version (it fails ``revoked_key``). Returns True when a first version was committed before the fence:
    that subject is reissued like any other."""
    rec = KeyRegistry(rt.store).bump_subject_key(
        job.tenant, subject, reason=job.reason, job_id=job.job_id, new_key_id=job.new_key_id
    )
    p = TemplateStore(rt.store).raise_fence(job.tenant, subject, rec.epoch, fence_job=job.job_id)
    if p is not None and p.version is not None:
        return True
    log.info("revoke %s: a subject with no committed version fenced off the revoked key", job.job_id)
    return False


def _revoke_status(rt: Runtime, job: RevokeJob, attempt: int, started: datetime) -> RevokeResult:
    book = rt.book
    # no subjects, or every chunk finished before the total was known
    final = maybe_finalize_revoke(rt, job.tenant, job.job_id)
    if final is not None:
        return RevokeResult.model_validate(final)
    p = book.progress(job.ref)
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
        subjects_fenced=int(book.get_fields(job.job_id).get("subjects_fenced", "0")),
        new_key_id=job.new_key_id,
    )
