"""Reissue on revocation, outside Celery: one re-enrolment chunk of a revoke job (``reenroll``).

For each subject of the chunk: bump its key version, raise the fence, re-enrol the current version's source images
under the new key version (one batched engine run for the chunk), commit, then mark every version made under an
older key version revoked. A subject that fails still has its old versions revoked (the old key version is
compromised). Progress goes to the parent's counters in the job book; the last chunk writes the revoke result.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from worker import metrics
from worker.contracts import ChunkResult, JobStatus, ReenrollChunk, S3Ref, child_job_id, job_ref
from worker.errors import CancelableError, ErasedError
from worker.service.clock import now
from worker.service.enrol import (
    PreparedImages,
    commit,
    erasure_watch,
    fetch_and_prepare,
    key_registry,
    seed_for,
)
from worker.service.erase import placeholder
from worker.service.fanout import maybe_finalize_revoke
from worker.storage import layout
from worker.storage.erasure import ErasureWatch
from worker.storage.templates import CommittedVersion, TemplateStore

if TYPE_CHECKING:
    import torch

    from worker.service.runtime import Runtime
    from worker.storage.records import SourceImage, SubjectKeyRecord


@dataclass
class _Item:
    """One subject of a chunk between its fence and its commit. ``committed`` is found (an earlier attempt's) or
    made; otherwise ``prepared`` and ``seed`` feed the chunk's engine run (the seed is dropped right after)."""

    subject: str
    child: str
    rec: SubjectKeyRecord
    committed: CommittedVersion | None
    prepared: PreparedImages | None = None
    seed: bytes | None = None

    @property
    def new_key(self) -> tuple[str, int]:
        return (self.rec.key_id, self.rec.key_version)

    @property
    def sources(self) -> list[SourceImage]:
        if self.prepared is None:
            raise RuntimeError(f"{self.subject}: no prepared images")
        return self.prepared.sources

    def engine_input(self) -> tuple[torch.Tensor, bytes]:
        """(faces, seed) for the engine run; the item forgets its seed."""
        if self.prepared is None or self.seed is None:
            raise RuntimeError(f"{self.subject}: not prepared for the engine")
        seed, self.seed = self.seed, None
        return self.prepared.faces, seed


def _revoke_old_versions(
    rt: Runtime,
    ts: TemplateStore,
    chunk: ReenrollChunk,
    subject: str,
    new_key: tuple[str, int],
    new_version: int | None,
) -> tuple[list[int], list[str]]:
    """Mark every version not made under the subject's new (key_id, key_version) revoked, unless it already is;
    purge images by policy. Runs after the fence was raised, so no version under an older key version can appear
    afterwards without being marked by the job that wrote it (``TemplateStore._advance_pointer``)."""
    revoked, uris = [], []
    for v in ts.list_versions(chunk.tenant, subject):
        if v == new_version:
            continue
        m = ts.get_manifest(chunk.tenant, subject, v)
        if (m.key_id, m.key_version) == new_key:
            continue
        existing = ts.revocation(chunk.tenant, subject, v)
        if existing is not None and existing.job_id != chunk.parent_job_id:
            continue  # revoked earlier (another revocation, or a fenced commit)
        ts.mark_revoked(
            chunk.tenant, subject, v, reason=chunk.reason, job_id=chunk.parent_job_id, replaced_by=new_version
        )
        if chunk.purge_old_images:
            ts.purge_images(chunk.tenant, subject, v)
        revoked.append(v)
        uris.append(rt.store.uri(layout.revocation_key(chunk.tenant, subject, v)))
    return revoked, uris


def reenroll(rt: Runtime, chunk: ReenrollChunk, attempt: int, started: datetime) -> ChunkResult:
    """Reissue the chunk's subjects (see the module docstring); a retryable fault propagates (the chunk is
    retried, and what it already did is found again), any other fails its subject alone."""
    ts = TemplateStore(rt.store)
    registry = key_registry(rt)
    book = rt.book
    parent, tenant = chunk.parent_job_id, chunk.tenant
    pref = job_ref(tenant, parent)  # the parent's records in the job book
    loaded = rt.engine()
    todo: list[_Item] = []
    fences: dict[str, ErasureWatch] = {}
    n_ok = n_failed = 0

    def fail(subject: str, e: CancelableError, new_key: tuple[str, int] | None) -> None:
        nonlocal n_failed
        if isinstance(e, ErasedError):  # erased meanwhile: nothing may name it again, the count stays right
            book.mark_failed(pref, {placeholder(tenant, subject): e.code})
            metrics.fanout_items("revoke", 1, "failed")
            n_failed += 1
            return
        if new_key is not None:  # the old key version is compromised: revoke its versions even without a replacement
            revoked, uris = _revoke_old_versions(rt, ts, chunk, subject, new_key, None)
            book.set_item_info(pref, subject, {"revoked_versions": revoked, "revocation_uris": uris})
        book.mark_failed(pref, {subject: e.code})
        metrics.fanout_items("revoke", 1, "failed")
        n_failed += 1

    for subject in chunk.subjects:
        if book.is_item_done(pref, subject):
            n_ok += 1
            continue
        child = child_job_id(parent, "subject", subject)
        new_key = None
        try:
            fences[subject] = erasure_watch(rt, tenant, subject)  # before the first write (the key bump)
            cur = ts.current(tenant, subject)
            rec = registry.bump_subject_key(
                tenant, subject, reason=chunk.reason, job_id=parent, new_key_id=chunk.new_key_id
            )
            new_key = (rec.key_id, rec.key_version)
            # the fence: from here on nothing derived under an older key version can become current
            ts.raise_fence(tenant, subject, rec.epoch)
            item = _Item(subject, child, rec, ts.find_committed(tenant, subject, child, rec.epoch))
            if item.committed is None:
                refs = [S3Ref.parse(s.uri) for s in cur.manifest.source_images]
                item.prepared = fetch_and_prepare(rt, loaded.engine, tenant, refs, "reenroll")
                item.seed = seed_for(rt, rec.key_id, tenant, subject, rec.key_version, "reenroll")
            todo.append(item)
        except CancelableError as e:
            if e.retryable:
                raise
            fail(subject, e, new_key)

    fresh = [it for it in todo if it.committed is None]
    if fresh:
        results = rt.engine_call("reenroll", [it.engine_input() for it in fresh])
        for it, result in zip(fresh, results, strict=True):
            it.committed = commit(
                rt,
                loaded,
                tenant=tenant,
                subject=it.subject,
                job_id=it.child,
                key_id=it.rec.key_id,
                key_version=it.rec.key_version,
                result=result,
                sources=it.sources,
                job_type="reenroll",
                key_epoch=it.rec.epoch,
            )
    for it in todo:
        c = it.committed
        if c is None:  # cannot happen: every item was found committed or has just been committed
            raise RuntimeError(f"{it.subject}: no committed version")
        ts.ensure_current(tenant, it.subject, c)  # a found commit of an earlier attempt: the pointer may lag
        revoked, uris = _revoke_old_versions(rt, ts, chunk, it.subject, it.new_key, c.version)
        try:
            fences[it.subject].check()  # erased while reissued: its writes are deleted again
        except ErasedError as e:
            fail(it.subject, e, None)
            continue
        book.set_item_info(
            pref,
            it.subject,
            {
                "new_version": c.version,
                "new_key_id": c.manifest.key_id,
                "new_key_version": c.manifest.key_version,
                "manifest_uri": c.manifest_uri,
                "revoked_versions": revoked,
                "revocation_uris": uris,
            },
        )
        if not book.is_item_done(pref, it.subject):
            metrics.fanout_items("revoke", 1, "succeeded")
        book.mark_succeeded(pref, [it.subject])
        n_ok += 1
    maybe_finalize_revoke(rt, tenant, parent)
    return ChunkResult(
        job_id=chunk.job_id,
        tenant=tenant,
        parent_job_id=parent,
        status=JobStatus.SUCCEEDED,
        attempts=attempt,
        started_at=started,
        finished_at=now(),
        succeeded=n_ok,
        failed=n_failed,
    )


def chunk_finished(rt: Runtime, chunk: ReenrollChunk, result: ChunkResult) -> None:
    """A chunk that failed or was dead-lettered as a whole: its unfinished subjects count as failed."""
    if JobStatus(result.status) == JobStatus.SUCCEEDED:
        return
    code = result.error.code.value if result.error is not None else "internal_error"
    book = rt.book
    pref = job_ref(chunk.tenant, chunk.parent_job_id)
    pending = {s: code for s in chunk.subjects if not book.is_item_done(pref, s)}
    book.mark_failed(pref, pending)
    maybe_finalize_revoke(rt, chunk.tenant, chunk.parent_job_id)
