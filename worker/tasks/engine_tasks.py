"""Engine-queue tasks (GPU work): enroll, verify, re-enrolment chunks of a revocation. Thin: parse, call
``worker.tasks.enrolment`` / ``fanout``, return the result model as JSON (see ``worker.tasks.common.run_job``)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from worker.contracts import EnrollResult, JobStatus, S3Ref, VerifyResult, child_job_id
from worker.errors import CancelableError, MalformedJobError, StaleKeyError
from worker.tasks import batcher, enrolment
from worker.tasks.app import app
from worker.tasks.common import now, run_job
from worker.tasks.config import TASK_ENGINE_PING, TASK_ENROLL, TASK_REENROLL_CHUNK, TASK_VERIFY
from worker.tasks.fanout import ChunkResult, ReenrollChunk, maybe_finalize_revoke, report_bulk_child

log = logging.getLogger(__name__)


# --- enroll ---------------------------------------------------------------------------------------------------------
FENCE_RETRIES = 3


def _enroll(rt: Any, job: Any, attempt: int, started: datetime) -> EnrollResult:
    """Derive under the subject's current key epoch and commit; when a revocation fences the commit off
    (``StaleKeyError``), re-derive under the new epoch (the images are fetched and aligned once)."""
    from worker.storage.templates import TemplateStore

    ts = TemplateStore(rt.store)
    registry = enrolment.key_registry(rt)
    prepared = None
    for _ in range(FENCE_RETRIES):
        known = registry.subject_key(job.tenant, job.subject)
        done = ts.find_committed(job.tenant, job.subject, job.job_id, known.epoch if known else 1)
        try:
            if done is not None:
                ts.ensure_current(job.tenant, job.subject, done)
                break
            loaded = rt.engine()
            enrolment.check_key(rt, job.tenant, job.key_id)  # unknown / revoked key: fail before download or write
            if prepared is None:
                prepared = enrolment.fetch_and_prepare(rt, loaded.engine, job.tenant, list(job.images), "enroll")
            rec = registry.ensure_subject_key(job.tenant, job.subject, job.key_id)
            seed = enrolment.seed_for(rt, rec.key_id, job.tenant, job.subject, rec.key_version, "enroll")
            (result,) = batcher.run_engine(rt, loaded, [(prepared.faces, seed)], "enroll")
            del seed
            done = enrolment.commit(
                rt,
                loaded,
                tenant=job.tenant,
                subject=job.subject,
                job_id=job.job_id,
                key_id=rec.key_id,
                key_version=rec.key_version,
                result=result,
                sources=prepared.sources,
                job_type="enroll",
                key_epoch=rec.epoch,
            )
            break
        except StaleKeyError:
            log.info("enrol fenced off by a revocation; re-deriving under the new key version")
            continue
    else:
        raise StaleKeyError(f"{job.tenant}/{job.subject}: revoked {FENCE_RETRIES} times while enrolling")
    m = done.manifest
    return EnrollResult(
        job_id=job.job_id,
        tenant=job.tenant,
        subject=job.subject,
        status=JobStatus.SUCCEEDED,
        attempts=attempt,
        started_at=started,
        finished_at=now(),
        version=done.version,
        created=done.created,
        key_id=m.key_id,
        key_version=m.key_version,
        manifest_uri=done.manifest_uri,
        template_uri=done.template_uri,
        image_uris=done.image_uris,
    )


def _bulk_reporter(parent: str | None) -> Any:
    if not parent:
        return None

    def report(rt: Any, job: Any, result: Any) -> None:
        report_bulk_child(rt, parent, job.job_id, result)

    return report


@app.task(name=TASK_ENROLL, bind=True)
def enroll(self: Any, *args: Any, parent: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Enrol one subject (``EnrollJob`` JSON) -> ``EnrollResult`` JSON. ``parent``: the bulk job it belongs to."""
    if parent is not None and not isinstance(parent, str):
        kwargs["parent"] = parent  # rejected as malformed
        parent = None
    return run_job(
        self,
        args,
        kwargs,
        kind="enroll",
        job_type="enroll",
        result_cls=EnrollResult,
        handler=_enroll,
        ident=lambda j: {"subject": j.subject, "key_id": j.key_id},
        on_terminal=_bulk_reporter(parent),
    )


# --- verify ---------------------------------------------------------------------------------------------------------
def _verify(rt: Any, job: Any, attempt: int, started: datetime) -> VerifyResult:
    loaded = rt.engine()
    out = enrolment.verify_probe(rt, loaded, job.tenant, job.subject, job.probe)
    threshold = job.threshold if job.threshold is not None else loaded.verify_threshold
    return VerifyResult(
        job_id=job.job_id,
        tenant=job.tenant,
        subject=job.subject,
        status=JobStatus.SUCCEEDED,
        attempts=attempt,
        started_at=started,
        finished_at=now(),
        version=out["version"],
        key_id=out["key_id"],
        key_version=out["key_version"],
        score=out["score"],
        threshold=threshold,
        decision="accept" if out["score"] >= threshold else "reject",
    )


@app.task(name=TASK_VERIFY, bind=True)
def verify(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Score a probe (``VerifyJob`` JSON) against the subject's current template -> ``VerifyResult`` JSON."""
    return run_job(
        self,
        args,
        kwargs,
        kind="verify",
        job_type="verify",
        result_cls=VerifyResult,
        handler=_verify,
        ident=lambda j: {"subject": j.subject},
    )


# --- re-enrolment chunk of a revocation ------------------------------------------------------------------------------
def _parse_chunk(data: dict[str, Any]) -> ReenrollChunk:
    try:
        return ReenrollChunk.model_validate_json(json.dumps(data))
    except (ValidationError, ValueError, TypeError):
        raise MalformedJobError("malformed re-enrolment chunk") from None


def _revoke_old_versions(
    rt: Any, ts: Any, chunk: ReenrollChunk, subject: str, new_key: tuple[str, int], new_version: int | None
) -> tuple[list[int], list[str]]:
    """Mark every version not made under the subject's new (key_id, key_version) revoked, unless it already is;
    purge images by policy. Runs after the fence was raised, so no version under an older key version can appear
    afterwards without being marked by the job that wrote it (``TemplateStore._advance_pointer``)."""
    from worker.storage import layout

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


def _reenroll(rt: Any, chunk: ReenrollChunk, attempt: int, started: datetime) -> ChunkResult:
    from worker import metrics
    from worker.storage.templates import TemplateStore

    ts = TemplateStore(rt.store)
    registry = enrolment.key_registry(rt)
    book = rt.book
    parent, tenant = chunk.parent_job_id, chunk.tenant
    loaded = rt.engine()
    todo: list[dict[str, Any]] = []
    n_ok = n_failed = 0

    def fail(subject: str, e: CancelableError, new_key: tuple[str, int] | None) -> None:
        nonlocal n_failed
        if new_key is not None:  # the old key version is compromised: revoke its versions even without a replacement
            revoked, uris = _revoke_old_versions(rt, ts, chunk, subject, new_key, None)
            book.set_item_info(parent, subject, {"revoked_versions": revoked, "revocation_uris": uris})
        book.mark_failed(parent, {subject: e.code})
        metrics.fanout_items("revoke", 1, "failed")
        n_failed += 1

    for subject in chunk.subjects:
        if book.is_item_done(parent, subject):
            n_ok += 1
            continue
        child = child_job_id(parent, "subject", subject)
        new_key = None
        try:
            cur = ts.current(tenant, subject)
            rec = registry.bump_subject_key(
                tenant, subject, reason=chunk.reason, job_id=parent, new_key_id=chunk.new_key_id
            )
            new_key = (rec.key_id, rec.key_version)
            # the fence: from here on nothing derived under an older key version can become current
            ts.raise_fence(tenant, subject, rec.epoch)
            item = {
                "subject": subject,
                "child": child,
                "rec": rec,
                "new_key": new_key,
                "committed": ts.find_committed(tenant, subject, child, rec.epoch),
            }
            if item["committed"] is None:
                refs = [S3Ref.parse(s.uri) for s in cur.manifest.source_images]
                item["prepared"] = enrolment.fetch_and_prepare(rt, loaded.engine, tenant, refs, "reenroll")
                item["seed"] = enrolment.seed_for(rt, rec.key_id, tenant, subject, rec.key_version, "reenroll")
            todo.append(item)
        except CancelableError as e:
            if e.retryable:
                raise
            fail(subject, e, new_key)

    fresh = [it for it in todo if it["committed"] is None]
    if fresh:
        results = batcher.run_engine(rt, loaded, [(it["prepared"].faces, it.pop("seed")) for it in fresh], "reenroll")
        for it, result in zip(fresh, results, strict=True):
            it["committed"] = enrolment.commit(
                rt,
                loaded,
                tenant=tenant,
                subject=it["subject"],
                job_id=it["child"],
                key_id=it["rec"].key_id,
                key_version=it["rec"].key_version,
                result=result,
                sources=it["prepared"].sources,
                job_type="reenroll",
                key_epoch=it["rec"].epoch,
            )
    for it in todo:
        c = it["committed"]
        ts.ensure_current(tenant, it["subject"], c)  # a found commit of an earlier attempt: the pointer may lag
        revoked, uris = _revoke_old_versions(rt, ts, chunk, it["subject"], it["new_key"], c.version)
        book.set_item_info(
            parent,
            it["subject"],
            {
                "new_version": c.version,
                "new_key_id": c.manifest.key_id,
                "new_key_version": c.manifest.key_version,
                "manifest_uri": c.manifest_uri,
                "revoked_versions": revoked,
                "revocation_uris": uris,
            },
        )
        if not book.is_item_done(parent, it["subject"]):
            metrics.fanout_items("revoke", 1, "succeeded")
        book.mark_succeeded(parent, [it["subject"]])
        n_ok += 1
    maybe_finalize_revoke(rt, parent)
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


def _chunk_terminal(rt: Any, chunk: ReenrollChunk, result: Any) -> None:
    """A chunk that failed or was dead-lettered as a whole: its unfinished subjects count as failed."""
    if JobStatus(result.status) == JobStatus.SUCCEEDED:
        return
    code = result.error.code.value if result.error is not None else "internal_error"
    book = rt.book
    pending = {s: code for s in chunk.subjects if not book.is_item_done(chunk.parent_job_id, s)}
    book.mark_failed(chunk.parent_job_id, pending)
    maybe_finalize_revoke(rt, chunk.parent_job_id)


@app.task(name=TASK_REENROLL_CHUNK, bind=True)
def reenroll_chunk(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Re-enrol a chunk of a revocation's subjects under their new key version (internal; sent by ``revoke``)."""
    return run_job(
        self,
        args,
        kwargs,
        kind="reenroll_chunk",
        job_type="reenroll",
        result_cls=ChunkResult,
        handler=_reenroll,
        ident=lambda c: {"parent_job_id": c.parent_job_id},
        parser=_parse_chunk,
        on_terminal=_chunk_terminal,
        result_parser=ChunkResult.model_validate,
    )


@app.task(name=TASK_ENGINE_PING)
def engine_ping() -> dict[str, Any]:
    """Liveness of an engine worker process: pid and whether its models are loaded (loads nothing)."""
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    return {"pid": os.getpid(), "engine_loaded": rt.engine_loaded, "at": now().isoformat()}
