"""JSON records stored in S3 (pydantic, no boto3). Embeddings are base64 of little-endian float32.

None of these records holds key material or seeds; templates hold embeddings of *cancelable* faces only.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

RECORD_SCHEMA: Literal[1] = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def encode_embedding(x: Any) -> str:
    """(D,) or (N, D) array-like -> base64 of little-endian float32 (row-major)."""
    a = np.ascontiguousarray(np.asarray(x, dtype="<f4"))
    return base64.b64encode(a.tobytes()).decode("ascii")


def decode_embedding(s: str, dim: int) -> np.ndarray:
    """Inverse of ``encode_embedding``: returns (D,) when the data holds one vector, else (N, D) float32."""
    a = np.frombuffer(base64.b64decode(s, validate=True), dtype="<f4").astype(np.float32)
    if dim <= 0 or a.size % dim:
        raise ValueError(f"embedding of {a.size} floats is not a multiple of dim {dim}")
    return a if a.size == dim else a.reshape(-1, dim)


class _Rec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = RECORD_SCHEMA


class SourceImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    etag: str | None = None


class Artefact(BaseModel):
    """An object written under the staging path; ``key`` relative to the store prefix."""

    model_config = ConfigDict(extra="forbid")

    key: str
    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    content_type: str


class TemplateRecord(_Rec):
    """The template of one version: the embedding (D,) of the cancelable face(s), how it was made, from what."""

    kind: Literal["template"] = "template"
    tenant: str
    subject: str
    job_id: str
    key_id: str
    key_version: int = Field(ge=1)
    bundle_id: str
    bundle_hashes: dict[str, str] = Field(default_factory=dict)
    """component name -> sha256 of its checkpoint."""
    algorithm: dict[str, Any] = Field(default_factory=dict)
    """Algorithm parameters (steps, layer split, loss weights, truncation, ...)."""
    embedding_dim: int = Field(ge=1)
    embedding: str
    """base64 float32 (D,): the template vector."""
    image_embeddings: str | None = None
    """base64 float32 (N, D): one embedding per cancelable image, in image order."""
    source_images: list[SourceImage]
    created_at: datetime = Field(default_factory=utcnow)
    enrolment_size: int | None = Field(default=None, ge=1)
    """How many photos the template was enrolled from (verify thresholds are calibrated per size)."""
    matcher: str | None = None
    """How verify scores against it: ``<recognizer format>:<sha256 prefix>:cosine`` (``bundle_config.matcher_of``)."""

    def size(self) -> int:
        """Enrolment size; templates written before it was recorded: one per source image."""
        return self.enrolment_size if self.enrolment_size is not None else max(1, len(self.source_images))

    def vector(self) -> np.ndarray:
        """(D,) float32."""
        v = decode_embedding(self.embedding, self.embedding_dim)
        if v.ndim != 1:
            raise ValueError("template embedding must be one vector")
        return v


class VersionManifest(_Rec):
    """The commit record of one version. A version exists iff its manifest exists; it lists every artefact."""

    kind: Literal["version"] = "version"
    tenant: str
    subject: str
    version: int = Field(ge=1)
    job_id: str
    key_id: str
    key_version: int = Field(ge=1)
    key_epoch: int | None = Field(default=None, ge=1)
    """The subject's key epoch the seed was derived under (``SubjectKeyRecord.epoch``); None on old records."""
    bundle_id: str
    template: Artefact
    images: list[Artefact]
    source_images: list[SourceImage]
    committed_at: datetime = Field(default_factory=utcnow)


class CurrentPointer(_Rec):
    """``current.json``: the current version AND the revocation fence.

    ``key_epoch`` is the subject's newest key epoch any writer has seen (a revocation raises it before it re-enrols).
    The pointer only moves forward in (key_epoch, version) order, and a commit derived under an older epoch than the
    pointer's is refused: the check and the move are one conditional PUT of this object, so a revocation can never
    be overtaken by an enrolment that derived its seed before it. When ``key_epoch`` is above the epoch of the
    version it points at, that version's key was revoked and a reissue is in flight.

    A *fence-only* pointer (``version`` None) is written by a key revocation for a subject under the revoked key that
    has no committed version yet (its first enrolment may be in flight): the subject has no current version, and no
    commit derived under an older epoch can ever create one. ``job_id`` is then the revocation's.
    """

    kind: Literal["current"] = "current"
    version: int | None = Field(default=None, ge=1)
    manifest_key: str | None = None
    job_id: str
    key_epoch: int | None = Field(default=None, ge=1)
    updated_at: datetime = Field(default_factory=utcnow)


class JobHint(_Rec):
    """``jobs/{job_id}.json``: the version slot a job last tried. Written before each manifest attempt."""

    kind: Literal["job_hint"] = "job_hint"
    job_id: str
    version: int = Field(ge=1)


class RevocationRecord(_Rec):
    kind: Literal["revocation"] = "revocation"
    tenant: str
    subject: str
    version: int = Field(ge=1)
    key_id: str
    key_version: int = Field(ge=1)
    reason: str
    job_id: str
    revoked_at: datetime = Field(default_factory=utcnow)
    replaced_by: int | None = None
    images_purged: bool = False


class DeadLetter(_Rec):
    """A job that kept failing or killed its worker. ``job`` is the job's wire JSON (it holds no secrets)."""

    kind: Literal["dead_letter"] = "dead_letter"
    job_id: str
    job_kind: str
    tenant: str
    attempts: int = Field(ge=0)
    error_code: str
    message: str = ""
    job: dict[str, Any] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)


class SubjectKeyRecord(_Rec):
    """``key.json`` of a subject: which key and key version its current (and next) template uses."""

    kind: Literal["subject_key"] = "subject_key"
    tenant: str
    subject: str
    key_id: str
    key_version: int = Field(ge=1)
    history: list[dict[str, Any]] = Field(default_factory=list)
    """Earlier (key_id, key_version, reason, job_id, at) entries, oldest first."""
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def epoch(self) -> int:
        """1 + the number of revocations of this subject: grows by one with every bump, whatever the key ID."""
        return len(self.history) + 1


class KeyStateRecord(_Rec):
    """``tenants/{tenant}/keys/{key_id}/state.json``: a key's state for ONE tenant (revocation is per tenant)."""

    kind: Literal["key_state"] = "key_state"
    tenant: str | None = None
    key_id: str
    state: Literal["active", "revoked"]
    reason: str | None = None
    job_id: str | None = None
    changed_at: datetime = Field(default_factory=utcnow)


class ErasureRecord(_Rec):
    """``tenants/{tenant}/erasures/{sha256}.json`` (one subject) or ``.../~tenant.json`` (every subject): what an
    erasure left behind. No subject ID in clear and no biometric data: ``subject_sha256`` is
    ``worker.storage.erasure.subject_digest``. ``state`` is ``erasing`` from before the first deletion until the
    last one; an enrolment refuses to start while it is ``erasing`` and deletes what it wrote when the record changed
    while it ran (``worker.storage.erasure``)."""

    kind: Literal["erasure"] = "erasure"
    tenant: str
    scope: Literal["subject", "tenant"]
    subject_sha256: str | None = None
    job_id: str
    reason: str
    state: Literal["erasing", "done"]
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    objects_deleted: int = Field(default=0, ge=0)
