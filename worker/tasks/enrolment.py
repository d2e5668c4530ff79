"""What the engine tasks do, outside Celery: fetch + validate images, derive seeds, run the engine, commit versions.

Shapes: aligned faces (N, 3, R, R) float in [-1, 1] (R = encoder input size); cancelable images (N, 3, G, G) in
[-1, 1] (G = generator resolution); embeddings (N, D); templates (D,).
Seeds are secrets: they live in local variables only, never in logs, results, exceptions or Redis.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker import metrics
from worker.contracts import S3Ref
from worker.errors import BundleError, CancelableError, RevokedKeyError
from worker.tasks import batcher
from worker.tasks.images import decode_image

log = logging.getLogger(__name__)


@dataclass
class PreparedImages:
    """Aligned faces (N, 3, R, R) and the provenance of each source image."""

    faces: Any  # torch.Tensor
    sources: list[Any]  # worker.storage.records.SourceImage


def fetch_and_prepare(rt: Any, engine: Any, tenant: str, refs: list[S3Ref], job_type: str) -> PreparedImages:
    """Check every reference against the tenant's input allow-list (before any S3 request), then download,
    validate, decode and align every image; the first bad image fails the whole job with its code."""
    import torch

    from worker.contracts.inputs import InputPolicy
    from worker.storage.records import SourceImage

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
                rgb = decode_image(body, max_bytes=w.max_bytes, max_pixels=w.max_pixels, name=ref.uri)
            with metrics.stage_timer("align", job_type):
                faces.append(engine.prepare(rgb))
        except CancelableError as e:
            metrics.images_processed(1, "failed", job_type, e.code)
            if not e.retryable and ref.uri not in str(e):
                raise type(e)(f"{ref.uri}: {e}") from None
            raise
        sources.append(SourceImage(uri=ref.uri, sha256=hashlib.sha256(body).hexdigest(), size=len(body), etag=etag))
    return PreparedImages(torch.stack(faces), sources)


def encode_png(image: Any) -> bytes:
    """(3, G, G) float in [-1, 1] -> PNG bytes (RGB, 8 bit)."""
    from PIL import Image

    a = ((image.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(dtype=__import__("torch").uint8)
    arr = np.ascontiguousarray(a.permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def template_record(
    loaded: Any,
    *,
    tenant: str,
    subject: str,
    job_id: str,
    key_id: str,
    key_version: int,
    result: Any,
    sources: list[Any],
) -> Any:
    from worker.storage.records import TemplateRecord, encode_embedding

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
    )


def commit(
    rt: Any,
    loaded: Any,
    *,
    tenant: str,
    subject: str,
    job_id: str,
    key_id: str,
    key_version: int,
    result: Any,
    sources: list[Any],
    job_type: str,
    key_epoch: int | None = None,
) -> Any:
    """Encode and commit one subject's version (idempotent per ``job_id``; fenced by ``key_epoch``)."""
    from worker.storage.templates import TemplateStore

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


def key_registry(rt: Any) -> Any:
    from worker.keys.providers import KeyRegistry

    return KeyRegistry(rt.store)


def check_key(rt: Any, tenant: str, key_id: str) -> None:
    """Unknown key, or key revoked for this tenant -> its error, before anything is downloaded or written."""
    with metrics.stage_timer("key", "enroll"):
        rt.keys.check_usable(tenant, key_id)


def seed_for(rt: Any, key_id: str, tenant: str, subject: str, key_version: int, job_type: str) -> bytes:
    with metrics.stage_timer("key", job_type):
        return rt.keys.seed_for(key_id, tenant, subject, key_version)


def run_engine(loaded: Any, items: list[tuple[Any, bytes]], job_type: str) -> list[Any]:
    """Batched enrolment of several subjects ((faces (N,3,R,R), seed) each) -> one EnrollResult per subject."""
    n = sum(int(f.shape[0]) for f, _ in items)
    metrics.batch_size(job_type, n)
    with metrics.stage_timer("optimise", job_type):
        out = loaded.engine.enroll_many(items)
    metrics.optimisation_steps(job_type, int(loaded.engine.config.steps))
    metrics.images_processed(n, "succeeded", job_type)
    return out


def verify_probe(rt: Any, loaded: Any, tenant: str, subject: str, probe: S3Ref) -> dict[str, Any]:
    """Score ``probe`` against the subject's current template under the subject's current key version."""
    import torch

    from worker.storage.templates import TemplateStore

    ts = TemplateStore(rt.store)
    cur = ts.current(tenant, subject)  # NoTemplateError
    m = cur.manifest
    if cur.superseded or ts.is_revoked(tenant, subject, cur.version):
        raise RevokedKeyError(f"current template of {tenant}/{subject} (version {cur.version}) is revoked")
    tmpl = ts.load_template(m)
    made_with = tmpl.algorithm.get("fingerprint") or f"{tmpl.bundle_id}:?"
    if tmpl.bundle_id != loaded.bundle_id or (tmpl.algorithm.get("fingerprint") and made_with != loaded.fingerprint):
        raise BundleError(
            f"template version {cur.version} was made by engine {made_with}; this worker runs "
            f"{loaded.fingerprint}: probes are only comparable under the same bundle and engine settings "
            "(re-enrol, or route to a matching worker)"
        )
    seed = seed_for(rt, m.key_id, tenant, subject, m.key_version, "verify")
    prepared = fetch_and_prepare(rt, loaded.engine, tenant, [probe], "verify")
    res = batcher.probe(rt, loaded, prepared.faces[0], seed)  # batched with other jobs' probes; metrics there
    # cosine; fp32 rounding can step just outside [-1, 1]
    score = min(1.0, max(-1.0, loaded.engine.score(res.embedding, torch.from_numpy(tmpl.vector()))))
    return {"version": cur.version, "key_id": m.key_id, "key_version": m.key_version, "score": score}
