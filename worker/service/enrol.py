"""Enrolment, outside Celery: fetch + validate images, derive seeds, run the engine, commit versions, and the
enrol-with-fence loop of an enrol job (``enroll``).

Shapes: aligned faces (N, 3, R, R) float in [-1, 1] (R = encoder input size); cancelable images (N, 3, G, G) in
[-1, 1] (G = generator resolution); embeddings (N, D); templates (D,).
Seeds are secrets: they live in local variables only, never in logs, results, exceptions or Redis.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np

from worker import metrics
from worker.contracts import EnrollJob, EnrollResult, JobStatus, S3Ref
from worker.errors import CancelableError, ErasedError, StaleKeyError
from worker.keys.registry import KeyRegistry
from worker.service.clock import now
from worker.service.images import decode_image
from worker.storage.erasure import ErasureWatch, watch
from worker.storage.keyindex import has_version
from worker.storage.records import SourceImage, TemplateRecord
from worker.storage.templates import CommittedVersion, TemplateStore

if TYPE_CHECKING:
    import torch

    from worker.algorithm.engine_base import EngineBase
    from worker.algorithm.engine_base import EnrollResult as EngineOutput
    from worker.service.engine import LoadedEngine
    from worker.service.runtime import Runtime

log = logging.getLogger(__name__)

FENCE_RETRIES = 3


@dataclass
class PreparedImages:
    """Aligned faces (N, 3, R, R) and the provenance of each source image."""

    faces: torch.Tensor
    sources: list[SourceImage]


def fetch_and_prepare(rt: Runtime, engine: EngineBase, tenant: str, refs: list[S3Ref], job_type: str) -> PreparedImages:
    """Check every reference against the tenant's input allow-list (before any S3 request), then download,
    validate, decode and align every image; the first bad image fails the whole job with its code."""
    import torch

    from worker.contracts.inputs import InputPolicy

    w = rt.settings.worker
    policy = InputPolicy.from_settings(rt.settings.s3)
    for ref in refs:
        policy.check(tenant, ref)  # ForbiddenInputError: nothing downloaded, nothing revealed about existence
    faces = []
    sources = []
    for ref in refs:
        try:
            with metrics.stage_timer("download", job_type):
                body, etag = rt.store.get_object(ref.bucket, ref.key, max_bytes=w.max_bytes)
            with metrics.stage_timer("decode", job_type):
                rgb = decode_image(
                    body,
                    max_bytes=w.max_bytes,
                    max_pixels=w.max_pixels,
                    max_pixels_full_decode=w.max_pixels_full_decode,
                    max_side=w.decode_max_side,
                    name=ref.uri,
                )
            with metrics.stage_timer("align", job_type):
                faces.append(engine.prepare(rgb))
        except CancelableError as e:
            metrics.images_processed(1, "failed", job_type, e.code)
            if not e.retryable and ref.uri not in str(e):
                raise type(e)(f"{ref.uri}: {e}") from None
            raise
        sources.append(SourceImage(uri=ref.uri, sha256=hashlib.sha256(body).hexdigest(), size=len(body), etag=etag))
    return PreparedImages(torch.stack(faces), sources)


def encode_png(image: torch.Tensor) -> bytes:
    """(3, G, G) float in [-1, 1] -> PNG bytes (RGB, 8 bit)."""
    import torch
    from PIL import Image

    a = ((image.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(dtype=torch.uint8)
    arr = np.ascontiguousarray(a.permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def template_record(
    loaded: LoadedEngine,
    *,
    tenant: str,
    subject: str,
    job_id: str,
    key_id: str,
    key_version: int,
    result: EngineOutput,
    sources: list[SourceImage],
) -> TemplateRecord:
    from worker.storage.records import encode_embedding

    return TemplateRecord(
        tenant=tenant,
        subject=subject,
        job_id=job_id,
        key_id=key_id,
        key_version=key_version,
        bundle_id=loaded.bundle_id,
        bundle_hashes=loaded.bundle_hashes,
        algorithm=loaded.algorithm,
        embedding_dim=int(result.template.shape[-1]),
        embedding=encode_embedding(result.template.numpy()),
        image_embeddings=encode_embedding(result.embeddings.numpy()),
        source_images=sources,
        enrolment_size=int(result.embeddings.shape[0]),
        matcher=loaded.matcher or None,
    )


def commit(
    rt: Runtime,
    loaded: LoadedEngine,
    *,
    tenant: str,
    subject: str,
    job_id: str,
    key_id: str,
    key_version: int,
    result: EngineOutput,
    sources: list[SourceImage],
    job_type: str,
    key_epoch: int | None = None,
) -> CommittedVersion:
    """Encode and commit one subject's version (idempotent per ``job_id``; fenced by ``key_epoch``)."""
    with metrics.stage_timer("template", job_type):
        rec = template_record(
            loaded,
            tenant=tenant,
            subject=subject,
            job_id=job_id,
            key_id=key_id,
            key_version=key_version,
            result=result,
            sources=sources,
        )
        pngs = [encode_png(img) for img in result.images]
    with metrics.stage_timer("upload", job_type):
        return TemplateStore(rt.store).commit_version(
            tenant, subject, job_id, template=rec, images=pngs, key_epoch=key_epoch
        )


def key_registry(rt: Runtime) -> KeyRegistry:
    """The key provider's own registry (one per process), or one over the runtime's store."""
    registry = getattr(rt.keys, "registry", None)
    return registry if isinstance(registry, KeyRegistry) else KeyRegistry(rt.store)


def check_key(rt: Runtime, tenant: str, key_id: str) -> None:
    """Unknown key, or key revoked for this tenant -> its error, before anything is downloaded or written."""
    with metrics.stage_timer("key", "enroll"):
        rt.keys.check_usable(tenant, key_id)


def seed_for(rt: Runtime, key_id: str, tenant: str, subject: str, key_version: int, job_type: str) -> bytes:
    with metrics.stage_timer("key", job_type):
        return rt.keys.seed_for(key_id, tenant, subject, key_version)


def run_engine(loaded: LoadedEngine, items: list[tuple[torch.Tensor, bytes]], job_type: str) -> list[EngineOutput]:
    """Batched enrolment of several subjects ((faces (N,3,R,R), seed) each) -> one engine result per subject."""
    n = sum(int(f.shape[0]) for f, _ in items)
    metrics.batch_size(job_type, n)
    with metrics.stage_timer("optimise", job_type):
        out = loaded.engine.enroll_many(items)
    metrics.optimisation_steps(job_type, int(loaded.engine.config.steps))
    metrics.images_processed(n, "succeeded", job_type)
    return out


def move_off_revoked_key(rt: Runtime, registry: KeyRegistry, ts: TemplateStore, job: EnrollJob) -> None:
    """A subject whose key record names a key revoked for the tenant but that never had a committed version (an
    enrolment under that key wrote the record after the revocation listed the tenant's subjects, then was refused):
    move it to the job's key and fence it, as the revocation does for a subject it finds in that state
    (``worker.service.revoke``). Without this the subject could never be enrolled again. A version under the
    revoked key that slipped in meanwhile is marked revoked (the new version supersedes it)."""
    known = registry.subject_key(job.tenant, job.subject)
    if known is None or known.key_id == job.key_id or not registry.is_revoked(job.tenant, known.key_id):
        return
    if has_version(rt.store, job.tenant, job.subject):
        return  # committed under the revoked key: the revocation reissues it (changing keys needs a revocation)
    rt.keys.check_usable(job.tenant, job.key_id)  # the key it moves to: unknown / revoked -> fail, nothing written
    rec = registry.bump_subject_key(
        job.tenant,
        job.subject,
        reason="key revoked before any version was committed",
        job_id=job.job_id,
        new_key_id=job.key_id,
    )
    p = ts.raise_fence(job.tenant, job.subject, rec.epoch, fence_job=job.job_id)
    if p is not None and p.version is not None:
        ts.mark_revoked(job.tenant, job.subject, p.version, reason="key revoked", job_id=job.job_id)
    log.info("a subject never committed moved off its revoked key to the enrolment's key")


def erasure_watch(rt: Runtime, tenant: str, subject: str, queued_at: float | None = None) -> ErasureWatch:
    """The erasure fence (``worker.storage.erasure``): read before the first write, ``check()`` after the commit."""
    from worker.contracts.inputs import InputPolicy

    bucket = InputPolicy.from_settings(rt.settings.s3).input_bucket
    return watch(rt.store, tenant, subject, input_bucket=bucket, queued_at=queued_at)


def forget_if_erased(rt: Runtime, job: EnrollJob, result: EnrollResult) -> bool:
    """Right after a successful enrolment's result was stored: if an erasure removed the version it names meanwhile
    (the erasure's pass over Redis ran before the result was stored), remove the job's records again, so that no
    stored result names an erased subject. The erasure deletes its S3 objects before it passes over Redis, so a
    version still present here means that pass is still to come and will find the result. Returns True when it
    removed them."""
    from worker.errors import ObjectNotFoundError
    from worker.storage.erasure import Erasures

    if result.status != JobStatus.SUCCEEDED or result.version is None:
        return False
    er = Erasures(rt.store)
    if er.read(job.tenant, job.subject) is None and er.read(job.tenant, None) is None:
        return False
    try:
        m = TemplateStore(rt.store).get_manifest(job.tenant, job.subject, result.version)
    except ObjectNotFoundError:
        m = None
    if m is not None and m.job_id == job.job_id:
        return False
    rt.book.forget_job(job.ref)
    log.info("an erasure overtook the enrolment after its commit: its stored result was removed")
    return True


def enroll(
    rt: Runtime, job: EnrollJob, attempt: int, started: datetime, queued_at: float | None = None
) -> EnrollResult:
    """Derive under the subject's current key epoch and commit; when a revocation fences the commit off
    (``StaleKeyError``), re-derive under the new epoch (the images are fetched and aligned once). Fenced against an
    erasure (``erasure_watch``): refused while one runs or if one began after ``queued_at``; its writes deleted
    again and ``ErasedError`` when one began while it ran."""
    if rt.book.was_erased(job.ref):
        raise ErasedError("this job's records were erased with its subject; it is not run again")
    fence = erasure_watch(rt, job.tenant, job.subject, queued_at)
    ts = TemplateStore(rt.store)
    registry = key_registry(rt)
    prepared = None
    for _ in range(FENCE_RETRIES):
        known = registry.subject_key(job.tenant, job.subject)
        done = ts.find_committed(job.tenant, job.subject, job.job_id, known.epoch if known else 1)
        try:
            if done is not None:
                ts.ensure_current(job.tenant, job.subject, done)
                break
            loaded = rt.engine()
            # unknown / revoked key: fail before download or write. ``seed_for`` checks once more (one small GET), after
            # the seconds the download and alignment take: the last check before a seed exists
            check_key(rt, job.tenant, job.key_id)
            if prepared is None:
                prepared = fetch_and_prepare(rt, loaded.engine, job.tenant, list(job.images), "enroll")
            move_off_revoked_key(rt, registry, ts, job)
            rec = registry.ensure_subject_key(job.tenant, job.subject, job.key_id)
            seed = seed_for(rt, rec.key_id, job.tenant, job.subject, rec.key_version, "enroll")
            (result,) = rt.run_engine(loaded, [(prepared.faces, seed)], "enroll")
            del seed
            done = commit(
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
    fence.check()  # an erasure that began while this job ran: its writes are deleted again, ErasedError
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
