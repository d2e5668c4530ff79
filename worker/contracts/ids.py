"""Identifier rules. Tenants, subjects and job IDs appear in S3 keys and Redis keys, so they are restricted to a
charset that is safe in both (no '/', no '..', no whitespace or control characters).

Patterns are applied with ``fullmatch``: ``re.match`` with ``$`` accepts a trailing newline (``$`` matches before a
final ``\n``), which once let tenant ``"acme\n"`` reach S3 keys and Redis keys."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import quote

from pydantic import AfterValidator

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{7,127}")
# KMS key IDs may be a UUID, ``alias/name`` or an ARN; local keyring IDs are plain names.
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,255}")


def check_name(v: str, what: str = "name") -> str:
    """Tenant or subject: 1-128 chars of ``[A-Za-z0-9._-]``, starting alphanumeric, no ``..``."""
    if not isinstance(v, str) or not _NAME.fullmatch(v) or ".." in v:
        raise ValueError(f"{what} must be 1-128 characters of [A-Za-z0-9._-], start alphanumeric, no '..'")
    return v


def check_job_id(v: str) -> str:
    """Job ID chosen by the producer: 8-128 chars of ``[A-Za-z0-9_-]``, starting alphanumeric (a UUID4 hex fits)."""
    if not isinstance(v, str) or not _JOB.fullmatch(v):
        raise ValueError("job_id must be 8-128 characters of [A-Za-z0-9_-], starting alphanumeric")
    return v


def check_key_id(v: str) -> str:
    """Key ID: a keyring name, a KMS key UUID, ``alias/...`` or a KMS key ARN (1-256 chars)."""
    if not isinstance(v, str) or not _KEY.fullmatch(v) or ".." in v or "//" in v:
        raise ValueError("key_id must be 1-256 characters of [A-Za-z0-9._:/-], start alphanumeric, no '..' or '//'")
    return v


JOB_REF_SEP = "/"


def job_ref(tenant: str, job_id: str) -> str:
    """The deployment-wide name of a job: ``{tenant}/{job_id}``. A job ID is chosen by its producer and is unique only
    within its tenant, so everything kept per job (Redis results, attempts, progress, dead letters, submit markers)
    and the Celery task ID are keyed by this reference: two tenants' jobs with the same ID never meet."""
    return f"{check_name(tenant, 'tenant')}{JOB_REF_SEP}{check_job_id(job_id)}"


def parse_job_ref(ref: str) -> tuple[str, str]:
    """``{tenant}/{job_id}`` -> ``(tenant, job_id)``; ``ValueError`` for anything else (a bare job ID included)."""
    if not isinstance(ref, str) or JOB_REF_SEP not in ref:
        raise ValueError("no tenant in the job reference (job IDs are unique per tenant)")
    tenant, _, job_id = ref.partition(JOB_REF_SEP)
    return check_name(tenant, "tenant"), check_job_id(job_id)


def key_id_path(key_id: str) -> str:
    """``key_id`` as one S3 path segment (reversible percent-encoding of ``/`` and ``:``)."""
    return quote(check_key_id(key_id), safe="-_.")


TenantId = Annotated[str, AfterValidator(lambda v: check_name(v, "tenant"))]
SubjectId = Annotated[str, AfterValidator(lambda v: check_name(v, "subject"))]
JobId = Annotated[str, AfterValidator(check_job_id)]
KeyId = Annotated[str, AfterValidator(check_key_id)]
