"""Internal wire models of a revocation's fan-out (control queue -> engine queue): the re-enrolment chunk a revoke
job sends, and the chunk's result. Producers never send these; they are validated like every other message."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.contracts.codes import JobStatus
from worker.contracts.ids import JobId, KeyId, SubjectId, TenantId
from worker.contracts.results import JobError


class ReenrollChunk(BaseModel):
    """Internal message (control -> engine queue): re-enrol these subjects for revocation job ``parent_job_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    kind: Literal["reenroll_chunk"] = "reenroll_chunk"
    job_id: JobId
    parent_job_id: JobId
    tenant: TenantId
    subjects: list[SubjectId] = Field(min_length=1, max_length=10_000)
    reason: str = Field(min_length=1, max_length=500)
    new_key_id: KeyId | None = None
    purge_old_images: bool = False


class ChunkResult(BaseModel):
    """What one re-enrolment chunk did (the revoke job's result is written by whichever chunk finishes last)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["reenroll_chunk"] = "reenroll_chunk"
    job_id: JobId
    tenant: TenantId
    parent_job_id: JobId | None = None
    status: JobStatus
    error: JobError | None = None
    attempts: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
    succeeded: int = 0
    failed: int = 0
