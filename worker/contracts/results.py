"""Results (worker -> producer, via the Celery result backend and S3). JSON on the wire; S3 locations as
``s3://`` strings; never embeddings, seeds, key material or image bytes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.contracts.codes import ErrorCode, JobStatus
from worker.contracts.ids import JobId, KeyId, SubjectId, TenantId, job_ref
from worker.contracts.jobs import SCHEMA_VERSION


class JobError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str = Field(max_length=2000)
    """Safe text only: IDs, file names, shapes, counts."""
    retryable: bool = False

    @classmethod
    def from_exception(cls, exc: BaseException) -> JobError:
        """Map a ``worker.errors.CancelableError`` to its code; anything else becomes ``internal_error`` with only
        the exception type name (its message might carry data we must not leak)."""
        from worker.errors import CancelableError

        if isinstance(exc, CancelableError):
            return cls(code=ErrorCode(exc.code), message=str(exc)[:2000], retryable=exc.retryable)
        return cls(code=ErrorCode.INTERNAL_ERROR, message=type(exc).__name__, retryable=False)


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    job_id: JobId
    status: JobStatus
    error: JobError | None = None
    attempts: int = Field(default=1, ge=0)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def ref(self) -> str:
        """``{tenant}/{job_id}`` of the job this is the result of (``worker.contracts.ids.job_ref``)."""
        return job_ref(str(getattr(self, "tenant", "")), self.job_id)


class EnrollResult(_Result):
    kind: Literal["enroll"] = "enroll"
    tenant: TenantId
    subject: SubjectId
    version: int | None = Field(default=None, ge=1)
    created: bool | None = None
    """False when the job had already committed its version (a retry or a duplicate): the existing one is returned."""
    key_id: KeyId | None = None
    key_version: int | None = Field(default=None, ge=1)
    manifest_uri: str | None = None
    template_uri: str | None = None
    image_uris: list[str] = Field(default_factory=list)


class VerifyResult(_Result):
    kind: Literal["verify"] = "verify"
    tenant: TenantId
    subject: SubjectId
    version: int | None = Field(default=None, ge=1)
    """The template version the probe was compared with."""
    key_id: KeyId | None = None
    key_version: int | None = Field(default=None, ge=1)
    score: float | None = None
    threshold: float | None = None
    decision: Literal["accept", "reject"] | None = None
    far: float | None = None
    """The false-accept rate the threshold stands for: measured at calibration among different people's cancelable
    faces under one key, for the template's enrolment size (None where the calibration does not cover it)."""
    far_ci95: tuple[float, float] | None = None
    """95 % confidence interval of ``far`` (the calibration's impostor sample is finite)."""
    enrolment_size: int | None = Field(default=None, ge=1)
    """How many photos the template was enrolled from (thresholds are calibrated per size)."""
    matcher: str | None = None
    """How the score was computed (recognizer and score); a template of another matcher is refused."""


class RevokeResult(_Result):
    kind: Literal["revoke"] = "revoke"
    tenant: TenantId
    subject: SubjectId | None = None
    key_id: KeyId | None = None
    reason: str | None = None
    subjects_total: int = Field(default=0, ge=0)
    subjects_done: int = Field(default=0, ge=0)
    subjects_failed: int = Field(default=0, ge=0)
    subjects_fenced: int = Field(default=0, ge=0)
    """Key revocation: subjects under the key with no committed version yet (a first enrolment possibly in flight),
    moved to the new key and fenced so that nothing can become current under the revoked key; not in the counts
    above (nothing to reissue)."""
    revoked_versions: list[int] = Field(default_factory=list)
    """Subject revocation: the version(s) marked revoked."""
    new_version: int | None = Field(default=None, ge=1)
    new_key_id: KeyId | None = None
    new_key_version: int | None = Field(default=None, ge=1)
    manifest_uri: str | None = None
    revocation_uris: list[str] = Field(default_factory=list)


class BulkResult(_Result):
    kind: Literal["bulk"] = "bulk"
    tenant: TenantId
    total: int | None = Field(default=None, ge=0)
    """Rows in the manifest once fully read (None while still streaming)."""
    enqueued: int = Field(default=0, ge=0)
    succeeded: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    dead_lettered: int = Field(default=0, ge=0)
    errors_by_code: dict[ErrorCode, int] = Field(default_factory=dict)
    report_uri: str | None = None
    """The finished job's report of failed rows (``.../jobs/{job_id}/report.jsonl``; ``report.csv`` beside it)."""


class EraseResult(_Result):
    kind: Literal["erase"] = "erase"
    tenant: TenantId
    subject_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """The erased subject, as its erasure record names it (the subject ID itself is not stored anywhere after the
    erasure, this result included)."""
    all_subjects: bool = False
    reason: str | None = None
    subjects_erased: int = Field(default=0, ge=0)
    """Subjects that had anything stored (0 for an unknown subject: the erasure is still recorded)."""
    objects_deleted: int = Field(default=0, ge=0)
    redis_keys_deleted: int = Field(default=0, ge=0)
    record_uri: str | None = None
    """The erasure record: when and by which job, keyed by a SHA-256 of tenant and subject."""


Result = Annotated[EnrollResult | VerifyResult | RevokeResult | BulkResult | EraseResult, Field(discriminator="kind")]
