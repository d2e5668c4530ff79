"""Erasure in S3: the erasure record, the deletion of everything derived from a subject (or a tenant), and the fence
that keeps an enrolment racing an erasure from leaving anything behind.

The record, ``tenants/{tenant}/erasures/{sha256}.json`` (``ErasureRecord``), is keyed by ``subject_digest`` (a
domain-separated SHA-256 of tenant and subject: the subject ID is never stored in clear) and says when and by which
job the subject was erased. A tenant-wide erasure writes ``tenants/{tenant}/erasures/~tenant.json``.

Protocol (``worker.service.erase`` and ``worker.service.enrol``):

1. The erasure writes its record FIRST, in state ``erasing``, then deletes (``delete_subject_objects``), then marks
   the record ``done``. A re-delivered erasure finds its own record and deletes again (deletes are idempotent).
2. An enrolment (or a revocation's reissue) reads the subject's and the tenant's records before its first write
   (``watch``): a record still ``erasing`` refuses it (``ErasedError``, code ``erased``). Right after its commit it
   reads them again (``ErasureWatch.check``): if either changed, an erasure began after the enrolment started and
   may have listed the subject before the enrolment's writes landed, so the enrolment runs the same deletion itself
   and fails ``erased``. If neither changed, every write of the enrolment happened before the erasure's record, so
   the erasure's listing (which follows its record) finds and deletes them.
3. A new enrolment that starts after the erasure is ``done`` is allowed (new consent); the record stays.

What the deletion covers, for one subject: every object under ``tenants/{t}/subjects/{s}/`` (versions, manifests,
templates, cancelable images, staging, key.json, revocation records, job hints, current.json); the subject's key
index markers under every key of the tenant; the tenant's dead letters whose job names the subject; and the source
photos its manifests name that lie in the tenant's upload prefix of the input bucket (photos the CLI uploaded).
Redis records are the job book's (``worker.storage.jobbook.JobBook.erase_subject``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from pydantic import ValidationError

from worker.errors import ErasedError, ObjectNotFoundError, StorageError, VersionConflictError
from worker.storage import layout
from worker.storage.client import ObjectStore
from worker.storage.deadletters import iter_dead_letters
from worker.storage.records import ErasureRecord, VersionManifest, utcnow

log = logging.getLogger(__name__)

DOMAIN = b"cancelable-erasure-v1"


def subject_digest(tenant: str, subject: str) -> str:
    """Lower-case hex SHA-256 naming a subject's erasure record (domain-separated: tenant, subject)."""
    return hashlib.sha256(b"\x1f".join([DOMAIN, tenant.encode(), subject.encode()])).hexdigest()


class Erasures:
    """Reads and writes erasure records (``subject`` None: the tenant-wide record)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def key(self, tenant: str, subject: str | None) -> str:
        return layout.erasure_key(tenant, None if subject is None else subject_digest(tenant, subject))

    def uri(self, tenant: str, subject: str | None) -> str:
        return self.store.uri(self.key(tenant, subject))

    def read(self, tenant: str, subject: str | None) -> tuple[ErasureRecord, str] | None:
        try:
            data, etag = self.store.get_json(self.key(tenant, subject))
        except ObjectNotFoundError:
            return None
        try:
            return ErasureRecord.model_validate(data), etag
        except ValidationError:
            raise StorageError(f"erasure record of tenant {tenant} does not validate") from None

    def begin(self, tenant: str, subject: str | None, job_id: str, reason: str) -> ErasureRecord:
        """Write the record in state ``erasing`` (before any deletion); a re-delivered job finds its own record."""
        cur = self.read(tenant, subject)
        if cur is not None and cur[0].job_id == job_id:
            return cur[0]
        rec = ErasureRecord(
            tenant=tenant,
            scope="tenant" if subject is None else "subject",
            subject_sha256=None if subject is None else subject_digest(tenant, subject),
            job_id=job_id,
            reason=reason,
            state="erasing",
        )
        self.store.put_json(self.key(tenant, subject), rec)
        return rec

    def finish(self, tenant: str, subject: str | None, job_id: str, deleted: int) -> ErasureRecord | None:
        """Mark this job's record ``done`` (with If-Match: a later erasure's record is left as it is). Returns the
        record as it now stands, None when another job's record replaced ours."""
        for _ in range(5):
            cur = self.read(tenant, subject)
            if cur is None or cur[0].job_id != job_id:
                return None if cur is None else cur[0]
            if cur[0].state == "done":
                return cur[0]
            done = cur[0].model_copy(
                update={"state": "done", "finished_at": utcnow(), "objects_deleted": cur[0].objects_deleted + deleted}
            )
            try:
                self.store.put_json(self.key(tenant, subject), done, if_match=cur[1])
                return done
            except VersionConflictError:
                continue
        raise VersionConflictError(f"erasure record of tenant {tenant} kept changing")


@dataclass(frozen=True)
class ErasureWatch:
    """The erasure records (subject, tenant) an enrolment saw before its first write: their ETags, None if absent."""

    store: ObjectStore
    tenant: str
    subject: str
    seen: tuple[str | None, str | None]
    input_bucket: str | None = None

    def changed(self) -> bool:
        now = _etags(Erasures(self.store), self.tenant, self.subject)
        return now != self.seen

    def check(self) -> None:
        """After the commit: if an erasure began meanwhile, delete what is stored for the subject (the enrolment's
        writes included) and raise ``ErasedError``."""
        if not self.changed():
            return
        n, _ = delete_subject_objects(self.store, self.tenant, self.subject, input_bucket=self.input_bucket)
        log.warning("enrolment overtaken by an erasure: its writes were deleted again (%d objects)", n)
        raise ErasedError("the subject was erased while this job ran; nothing of it was kept")


def _etags(er: Erasures, tenant: str, subject: str) -> tuple[str | None, str | None]:
    s, t = er.read(tenant, subject), er.read(tenant, None)
    return (None if s is None else s[1], None if t is None else t[1])


def watch(
    store: ObjectStore, tenant: str, subject: str, input_bucket: str | None = None, queued_at: float | None = None
) -> ErasureWatch:
    """Read the erasure records before an enrolment's first write; ``ErasedError`` while one is ``erasing``, or
    when one began after the job was queued (``queued_at``, epoch seconds: a job queued before an erasure and
    delivered after it is not a new enrolment)."""
    er = Erasures(store)
    s, t = er.read(tenant, subject), er.read(tenant, None)
    for r in (s, t):
        if r is not None and r[0].state == "erasing":
            raise ErasedError("an erasure of this subject is in progress; enrol again once it has finished")
        if r is not None and queued_at is not None and r[0].started_at.timestamp() > queued_at:
            raise ErasedError("the subject was erased after this job was queued; queue a new enrolment")
    seen = (None if s is None else s[1], None if t is None else t[1])
    return ErasureWatch(store, tenant, subject, seen, input_bucket)


def _uploads_named(store: ObjectStore, tenant: str, subject: str, input_bucket: str | None) -> list[str]:
    """Keys in the input bucket, under the tenant's upload prefix, of the source photos the subject's manifests
    name (photos the CLI uploaded for it)."""
    if input_bucket is None:
        return []
    ours = f"s3://{input_bucket}/{layout.tenant_input_prefix(tenant)}uploads/"
    keys: list[str] = []
    for o in store.list(layout.versions_prefix(tenant, subject)):
        try:
            data, _ = store.get_json(o.key)
            m = VersionManifest.model_validate(data)
        except (ObjectNotFoundError, ValidationError):
            continue
        keys += [s.uri[len(f"s3://{input_bucket}/") :] for s in m.source_images if s.uri.startswith(ours)]
    return sorted(set(keys))


def _names_subject(job: dict[str, object], subject: str) -> bool:
    subjects = job.get("subjects")
    return job.get("subject") == subject or (isinstance(subjects, list) and subject in subjects)


def delete_subject_objects(
    store: ObjectStore, tenant: str, subject: str, *, input_bucket: str | None = None, tenant_wide: bool = False
) -> tuple[int, set[str]]:
    """Delete every object derived from ``subject`` (see the module docstring). Returns the number deleted and the
    IDs of the jobs that wrote under the subject (from its job hints and staging folders: the caller tombstones
    them). Idempotent: run again, it finds what is left (nothing, once complete). ``tenant_wide``: the tenant's
    dead letters and index markers are deleted as a whole afterwards (``delete_tenant_objects``), skip them here."""
    keys: list[str] = []
    uploads = _uploads_named(store, tenant, subject, input_bucket)
    if uploads and input_bucket is not None:
        store.delete_many(input_bucket, uploads)
    for key_dir in [] if tenant_wide else list(store.list_dirs(layout.keys_prefix(tenant))):
        marker_prefix = f"{layout.keys_prefix(tenant)}{key_dir}/subjects/{subject}{layout.INDEX_SEP}"
        keys += [o.key for o in store.list(marker_prefix)]
    for job_id in [] if tenant_wide else list(iter_dead_letters(store, tenant)):
        k = layout.dead_letter_key(tenant, job_id)
        try:
            data, _ = store.get_json(k)
        except ObjectNotFoundError:
            continue
        job = data.get("job") if isinstance(data, dict) else None
        if isinstance(job, dict) and _names_subject(job, subject):
            keys.append(k)
    own = [o.key for o in store.list(layout.subject_prefix(tenant, subject))]
    jobs = {_job_of(k[len(layout.subject_prefix(tenant, subject)) :]) for k in own} - {None}
    keys += own
    store.delete_many(store.bucket, [store.full_key(k) for k in keys])
    _delete_folders(store, layout.subject_prefix(tenant, subject), own)
    return len(keys) + len(uploads), {j for j in jobs if j is not None}


def _delete_folders(store: ObjectStore, top: str, keys: list[str]) -> None:
    """Folder entries an object store may keep after their objects were deleted (SeaweedFS's filer lists an empty
    folder, named by the subject ID, in delimiter listings): deepest first, then ``top``. No-ops on AWS S3."""
    folders = {top}
    for k in keys:
        parts = k[len(top) :].split("/")[:-1]
        folders.update(top + "/".join(parts[: i + 1]) + "/" for i in range(len(parts)))
    for f in sorted(folders, key=lambda x: (-x.count("/"), x)):
        try:
            store.delete(f)
        except StorageError:
            log.debug("folder entry not deleted")


def _job_of(rel: str) -> str | None:
    """The job ID in a key below a subject's prefix: ``jobs/{job}.json`` or ``staging/{job}/...``."""
    parts = rel.split("/")
    if parts[0] == "jobs" and len(parts) == 2 and parts[1].endswith(".json"):
        return parts[1][: -len(".json")]
    if parts[0] == "staging" and len(parts) > 2:
        return parts[1]
    return None


def delete_tenant_objects(store: ObjectStore, tenant: str, *, input_bucket: str | None = None) -> int:
    """After every subject of ``tenant`` was erased: the tenant-level objects that can name subjects (dead letters,
    job bookkeeping, key index markers) and the tenant's uploaded photos. Key states and erasure records stay."""
    n = 0
    for prefix in (layout.dead_letters_prefix(tenant), f"{layout.subjects_prefix(tenant)[: -len('subjects/')]}jobs/"):
        keys = [o.key for o in store.list(prefix)]
        store.delete_many(store.bucket, [store.full_key(k) for k in keys])
        n += len(keys)
    for key_dir in store.list_dirs(layout.keys_prefix(tenant)):
        keys = [o.key for o in store.list(f"{layout.keys_prefix(tenant)}{key_dir}/subjects/")]
        store.delete_many(store.bucket, [store.full_key(k) for k in keys])
        n += len(keys)
    if input_bucket is not None:
        prefix = f"{layout.tenant_input_prefix(tenant)}uploads/"
        ups = [o.key for o in store.list(prefix, bucket=input_bucket)]
        store.delete_many(input_bucket, ups)
        n += len(ups)
    return n


__all__ = [
    "ErasureWatch",
    "Erasures",
    "delete_subject_objects",
    "delete_tenant_objects",
    "subject_digest",
    "watch",
]
