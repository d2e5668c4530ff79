"""Job messages (producer -> worker). Strict, ``extra="forbid"``, frozen; JSON on the wire only.

Every job carries ``kind`` (the discriminator), ``job_id`` (chosen by the producer; it determines every output path,
so a re-delivered or duplicated job is recognised) and ``schema_version``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.contracts.ids import JobId, KeyId, SubjectId, TenantId, job_ref
from worker.contracts.naming import compile_rule
from worker.contracts.refs import S3Prefix, S3Ref

SCHEMA_VERSION: Literal[1] = 1


def _printable(v: str) -> str:
    if any(ord(c) < 32 for c in v):
        raise ValueError("reason must not contain control characters")
    return v


Reason = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_printable)]
"""Why a revocation or an erasure was asked for: 1-500 characters, no control characters (it is printed)."""
MAX_IMAGES_PER_JOB = 64

DEFAULT_NAMING_RULE = r"^(?P<subject>[A-Za-z0-9][A-Za-z0-9._-]*)/[^/]+\.(?i:jpe?g|png|webp)$"
"""Prefix manifests: key (relative to the prefix) -> subject; default ``<subject>/<file>.jpg``."""


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: JobId

    @property
    def ref(self) -> str:
        """``{tenant}/{job_id}``: the job's name in Redis and its Celery task ID (job IDs are unique per tenant)."""
        return job_ref(str(getattr(self, "tenant", "")), self.job_id)


class EnrollJob(_Job):
    """Enrol one subject: 1-64 source images, all of one face, under ``key_id`` (current key version of the subject,
    or version 1 if the subject is new)."""

    kind: Literal["enroll"] = "enroll"
    tenant: TenantId
    subject: SubjectId
    images: list[S3Ref] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB)
    key_id: KeyId

    @field_validator("images")
    @classmethod
    def _distinct(cls, v: list[S3Ref]) -> list[S3Ref]:
        if len(v) > 1 and len({r.uri for r in v}) != len(v):
            raise ValueError("images contains duplicate refs")
        return v


class VerifyJob(_Job):
    """Score one probe against the subject's current template, under the subject's current key."""

    kind: Literal["verify"] = "verify"
    tenant: TenantId
    subject: SubjectId
    probe: S3Ref
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    """Overrides ``engine.verify_threshold`` for this job."""
    far: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Decide at the bundle's calibrated threshold for this false-accept rate (and the template's enrolment size)
    instead; at most one of ``threshold`` and ``far``."""

    @model_validator(mode="after")
    def _threshold_or_far(self) -> VerifyJob:
        if self.threshold is not None and self.far is not None:
            raise ValueError("give threshold or far, not both")
        return self


class RevokeJob(_Job):
    """Revoke one subject's current template (new key version, re-enrol, old version marked revoked), or a whole
    compromised key (every subject of ``tenant`` under it is reissued under ``new_key_id``). Exactly one of
    ``subject`` and ``key_id``."""

    kind: Literal["revoke"] = "revoke"
    tenant: TenantId
    subject: SubjectId | None = None
    key_id: KeyId | None = None
    reason: Reason
    new_key_id: KeyId | None = None
    """Subject revocation: optional (default: same key, next version). Key revocation: required."""
    purge_old_images: bool = False
    """Delete the revoked version's cancelable images once the new version is committed."""

    @model_validator(mode="after")
    def _one_target(self) -> RevokeJob:
        if (self.subject is None) == (self.key_id is None):
            raise ValueError("give exactly one of subject and key_id")
        if self.key_id is not None and self.new_key_id is None:
            raise ValueError("revoking a whole key needs new_key_id to reissue its subjects under")
        if self.key_id is not None and self.new_key_id == self.key_id:
            raise ValueError("new_key_id must differ from the revoked key_id")
        return self


class EraseJob(_Job):
    """Erase one subject (every object and record derived from it) or, with ``all_subjects``, every subject of the
    tenant. Leaves only an erasure record keyed by a SHA-256 of tenant and subject (no subject ID in clear, no
    biometric data). ``confirm`` must repeat the tenant for ``all_subjects``."""

    kind: Literal["erase"] = "erase"
    tenant: TenantId
    subject: SubjectId | None = None
    all_subjects: bool = False
    confirm: TenantId | None = None
    reason: Reason

    @model_validator(mode="after")
    def _one_target(self) -> EraseJob:
        if (self.subject is None) == (not self.all_subjects):
            raise ValueError("give exactly one of subject and all_subjects")
        if self.all_subjects and self.confirm != self.tenant:
            raise ValueError("erasing every subject of a tenant needs confirm equal to the tenant")
        return self


class BulkManifest(BaseModel):
    """Where a bulk job's enrolments are listed.

    - ``csv``: header ``subject,image`` (optional ``key_id`` column); one image per row (one row per line); rows of
      one subject are consecutive (``worker.contracts.manifest`` for the row rules).
    - ``jsonl``: one ``{"subject": ..., "images": ["s3://..."], "key_id": optional}`` per line.
    - ``prefix``: every object under ``uri`` (an ``s3://bucket/prefix/``) whose key relative to the prefix matches
      ``naming_rule`` (an RE2 regex with a named group ``subject``: ``worker.contracts.naming``); objects of one
      subject are grouped.

    ``uri`` is ``s3://...`` (workers read it, inside the tenant's allowed inputs: ``worker.contracts.inputs``) or,
    producer side only, a local file path that the producer checks and uploads before queueing.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal["csv", "jsonl", "prefix"]
    uri: str = Field(min_length=1, max_length=2048)
    naming_rule: str | None = None

    @model_validator(mode="after")
    def _check(self) -> BulkManifest:
        if self.format == "prefix":
            S3Prefix.model_validate(self.uri)
            compile_rule(self.naming_rule or DEFAULT_NAMING_RULE)
        else:
            if self.naming_rule is not None:
                raise ValueError("naming_rule applies to format=prefix only")
            if self.uri.startswith("s3://"):
                S3Ref.model_validate(self.uri)
        return self

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def rule(self) -> Any:
        """The compiled naming rule (RE2: linear-time matching, ``worker.contracts.naming``)."""
        return compile_rule(self.naming_rule or DEFAULT_NAMING_RULE)


class BulkJob(_Job):
    """Enrol every subject a manifest lists, in chunks; resumable (child job IDs derive from ``job_id``)."""

    kind: Literal["bulk"] = "bulk"
    tenant: TenantId
    key_id: KeyId
    """Default key for rows that do not name one."""
    manifest: BulkManifest
    chunk_size: int = Field(default=64, ge=1, le=10_000)

    @model_validator(mode="after")
    def _s3_only(self) -> BulkJob:
        if not self.manifest.is_s3:
            raise ValueError("a queued bulk job needs an s3:// manifest (the producer uploads local files first)")
        return self


Job = Annotated[EnrollJob | VerifyJob | RevokeJob | BulkJob | EraseJob, Field(discriminator="kind")]


def child_job_id(parent_job_id: str, *parts: str | int) -> str:
    """Deterministic child job ID (fan-out, bulk rows): the same parent and parts give the same ID on every retry."""
    import hashlib

    h = hashlib.sha256("\x1f".join([parent_job_id, *map(str, parts)]).encode()).hexdigest()[:32]
    return f"{parent_job_id[:64]}-{h}"
