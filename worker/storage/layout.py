"""The S3 layout (docs/storage-layout.md). Pure functions from IDs to keys, relative to the store's prefix.

    tenants/{tenant}/subjects/{subject}/
        current.json                          pointer to the current version (moved with If-Match)
        versions/{version:010d}.json          version manifest = commit record (written with If-None-Match: *)
        jobs/{job_id}.json                    job -> version hint (idempotency; see templates.py)
        staging/{job_id}/{attempt}/template.json
        staging/{job_id}/{attempt}/images/{i:03d}.png      cancelable images
        revocations/{version:010d}.json       revocation record of one version
        key.json                              the subject's key ID and key version (+ history)
    tenants/{tenant}/dead-letters/{job_id}.json
    tenants/{tenant}/erasures/{sha256}.json   erasure record of one subject (keyed by a hash: no subject ID in clear)
    tenants/{tenant}/erasures/~tenant.json    erasure record of a tenant-wide erasure
    tenants/{tenant}/jobs/{job_id}/...        job bookkeeping (revoke progress snapshots)
    tenants/{tenant}/jobs/{job_id}/report.jsonl|csv   a bulk job's failed rows (line, subject, code, message)
    tenants/{tenant}/keys/{key_id_path}/state.json   key state for this tenant (active / revoked + reason)
    tenants/{tenant}/keys/{key_id_path}/index.json   the key's subject index is complete (worker/storage/keyindex.py)
    tenants/{tenant}/keys/~index.json         every key's subject index is complete (the tenant was backfilled)
    tenants/{tenant}/keys/{key_id_path}/subjects/{subject}~{kind}   subject index markers (empty objects)

The input bucket (``s3.input_bucket``, never the bucket above) holds source images producers upload from local files:

    tenants/{tenant}/                         the tenant's input prefix
        uploads/{sha256[:32]}.{ext}           one object per distinct file content (re-uploads are no-ops)
        manifests/{job_id}.csv|jsonl          local bulk manifests the producer uploaded

Zero-padded versions keep listing order equal to version order.
"""

from __future__ import annotations

from worker.contracts.ids import check_job_id, check_name, key_id_path

VERSION_DIGITS = 10


def _t(tenant: str) -> str:
    return f"tenants/{check_name(tenant, 'tenant')}"


def subject_prefix(tenant: str, subject: str) -> str:
    return f"{_t(tenant)}/subjects/{check_name(subject, 'subject')}/"


def subjects_prefix(tenant: str) -> str:
    return f"{_t(tenant)}/subjects/"


def current_key(tenant: str, subject: str) -> str:
    return subject_prefix(tenant, subject) + "current.json"


def versions_prefix(tenant: str, subject: str) -> str:
    return subject_prefix(tenant, subject) + "versions/"


def version_key(tenant: str, subject: str, version: int) -> str:
    if version < 1:
        raise ValueError("versions start at 1")
    return f"{versions_prefix(tenant, subject)}{version:0{VERSION_DIGITS}d}.json"


def version_from_key(key: str) -> int:
    return int(key.rsplit("/", 1)[-1].split(".", 1)[0])


def job_hint_key(tenant: str, subject: str, job_id: str) -> str:
    return f"{subject_prefix(tenant, subject)}jobs/{check_job_id(job_id)}.json"


def staging_prefix(tenant: str, subject: str, job_id: str, attempt: str) -> str:
    if not attempt.isalnum():
        raise ValueError("attempt token must be alphanumeric")
    return f"{subject_prefix(tenant, subject)}staging/{check_job_id(job_id)}/{attempt}/"


def template_key(staging: str) -> str:
    return staging + "template.json"


def image_key(staging: str, index: int, ext: str = "png") -> str:
    return f"{staging}images/{index:03d}.{ext}"


def revocation_key(tenant: str, subject: str, version: int) -> str:
    return f"{revocations_prefix(tenant, subject)}{version:0{VERSION_DIGITS}d}.json"


def revocations_prefix(tenant: str, subject: str) -> str:
    return subject_prefix(tenant, subject) + "revocations/"


def job_report_key(tenant: str, job_id: str, ext: str) -> str:
    """A bulk job's report of failed rows (``ext`` jsonl or csv)."""
    if ext not in ("jsonl", "csv"):
        raise ValueError("a report is jsonl or csv")
    return f"{_t(tenant)}/jobs/{check_job_id(job_id)}/report.{ext}"


def manifest_upload_key(tenant: str, job_id: str, ext: str) -> str:
    """Input-bucket key of a local manifest file the producer uploads for a bulk job (``ext`` csv or jsonl)."""
    if ext not in ("jsonl", "csv"):
        raise ValueError("a manifest is csv or jsonl")
    return f"{tenant_input_prefix(tenant)}manifests/{check_job_id(job_id)}.{ext}"


def tenant_input_prefix(tenant: str) -> str:
    """The tenant's prefix in the input bucket (not the template bucket)."""
    return f"{_t(tenant)}/"


def upload_key(tenant: str, sha256_hex: str, ext: str) -> str:
    """Input-bucket key of an uploaded source image, named by its content hash."""
    if len(sha256_hex) != 64 or not all(c in "0123456789abcdef" for c in sha256_hex) or not ext.isalnum():
        raise ValueError("upload key needs a lower-case hex SHA-256 and an alphanumeric extension")
    return f"{tenant_input_prefix(tenant)}uploads/{sha256_hex[:32]}.{ext}"


def subject_key_state(tenant: str, subject: str) -> str:
    return subject_prefix(tenant, subject) + "key.json"


def dead_letters_prefix(tenant: str) -> str:
    return f"{_t(tenant)}/dead-letters/"


def dead_letter_key(tenant: str, job_id: str) -> str:
    return f"{dead_letters_prefix(tenant)}{check_job_id(job_id)}.json"


def key_state_key(tenant: str, key_id: str) -> str:
    return f"{_t(tenant)}/keys/{key_id_path(key_id)}/state.json"


def key_index_prefix(tenant: str, key_id: str) -> str:
    """Where a key's subject index markers live (one flat 'directory': one LIST page holds 1,000 markers)."""
    return f"{_t(tenant)}/keys/{key_id_path(key_id)}/subjects/"


INDEX_SEP = "~"  # never in a subject ID ([A-Za-z0-9._-]); sorts after every character allowed in one


def key_index_marker(tenant: str, key_id: str, subject: str, kind: str) -> str:
    return f"{key_index_prefix(tenant, key_id)}{check_name(subject, 'subject')}{INDEX_SEP}{kind}"


def key_index_state(tenant: str, key_id: str) -> str:
    return f"{_t(tenant)}/keys/{key_id_path(key_id)}/index.json"


def tenant_key_index_state(tenant: str) -> str:
    """Every key of the tenant is indexed ('~' is quoted in a key ID's path segment, so no key's folder is this)."""
    return f"{_t(tenant)}/keys/~index.json"


def erasures_prefix(tenant: str) -> str:
    return f"{_t(tenant)}/erasures/"


def erasure_key(tenant: str, digest: str | None) -> str:
    """A subject's erasure record (``digest``: ``worker.storage.erasure.subject_digest``), or (None) the tenant's."""
    if digest is None:
        return erasures_prefix(tenant) + "~tenant.json"
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError("an erasure record is named by a lower-case hex SHA-256")
    return f"{erasures_prefix(tenant)}{digest}.json"


def keys_prefix(tenant: str) -> str:
    """Every key's folder of the tenant (state, index markers)."""
    return f"{_t(tenant)}/keys/"
