"""Atomic, monotonic, idempotent template versions per (tenant, subject).

Commit protocol (``TemplateStore.commit_version``):

1. If the job already committed a version (found through its job hint, see below), roll the ``current`` pointer
   forward to it if needed and return it (``created=False``): a retried or duplicated job never makes a second one.
2. Write the artefacts (template JSON, cancelable images) under ``staging/{job_id}/{attempt}/`` - a path no reader
   looks at until a manifest names it. ``attempt`` is a fresh token so that two live executions of one job never
   overwrite each other's bytes under a committed manifest.
3. Claim the next version slot: write the job hint (``jobs/{job_id}.json`` = slot), then the manifest
   ``versions/{slot}.json`` with ``If-None-Match: *``. On 412 read that manifest: ours (a concurrent duplicate won)
   -> done, else try the next slot. Slots are therefore dense (1, 2, 3 ...) and each belongs to exactly one job.
4. Move ``current.json`` to the slot with ``If-Match: <etag>`` (``If-None-Match: *`` for the first version), never
   backwards in (key epoch, version) order: if another writer already moved it past our slot, leave it.

Revocation fence: a commit carries the subject key epoch its seed was derived under (``key_epoch``). The pointer
holds the newest epoch any writer has seen; a revocation raises it (``raise_fence``) right after bumping the subject's
key record and before re-enrolling. A commit whose epoch is below the pointer's is refused in the same conditional
PUT that would move the pointer: its manifest is marked revoked (reason ``FENCED``) and ``StaleKeyError`` tells
the job to re-derive. So an enrolment in flight during a revocation can never become current under the revoked key
version, and a reissue can never be overtaken (tests/integration/test_faults_revocation.py).

First enrolments and key revocations: a subject whose first commit has not happened yet has no pointer to fence. A
key revocation that finds such a subject under the revoked key moves its ``key.json`` to the new key and writes a
*fence-only* pointer (no version) at the new epoch with ``If-None-Match``; the first commit writes its pointer with
``If-None-Match`` too, so exactly one of them wins: either the commit (then the revocation reissues the subject like
any committed one) or the fence (then the enrolment's commit is refused as above and the job fails ``revoked_key``).

Readers go pointer -> manifest -> artefacts, so they only ever see committed versions with every artefact written.

Why a job never gets two versions: slots are dense (a writer only moves to slot n+1 after slot n turned out to hold
another job's manifest), the hint is written before each manifest attempt with the slot about to be tried, so a
job's committed slot is never below its hint, and every attempt starts its walk at ``max(first free slot above the
hint, pointer + 1)`` with the pointer read *before* the hint. If a twin execution committed slot V before our hint
read, the walk from the hint finds it; if after, V is above the pointer we read, so our walk reaches V and the
412 there shows our own job ID.
(SeaweedFS 4.48 honours both conditions on PutObject; tests/integration/test_storage_versions.py checks it.)
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from worker.errors import (
    HashMismatchError,
    NoTemplateError,
    ObjectNotFoundError,
    StaleKeyError,
    StorageError,
    VersionConflictError,
)
from worker.storage import layout
from worker.storage.client import ObjectStore
from worker.storage.keyindex import KeyIndex
from worker.storage.records import (
    Artefact,
    CurrentPointer,
    JobHint,
    RevocationRecord,
    TemplateRecord,
    VersionManifest,
    utcnow,
)

log = logging.getLogger(__name__)

MAX_SLOTS = 10_000
POINTER_TRIES = 50
FENCED = "fenced: the subject's key was revoked before this version could become current"


@dataclass(frozen=True)
class CommittedVersion:
    """A committed version. ``created`` is False when an existing version was returned (retry or duplicate)."""

    version: int
    manifest: VersionManifest
    manifest_uri: str
    created: bool = False
    fence_epoch: int | None = None  # the pointer's key epoch when read through ``current``

    @property
    def superseded(self) -> bool:
        """The subject's key was revoked after this version was made (a reissue is in flight or failed)."""
        made = self.manifest.key_epoch
        return self.fence_epoch is not None and made is not None and made < self.fence_epoch

    @property
    def template_uri(self) -> str:
        return self.manifest.template.uri

    @property
    def image_uris(self) -> list[str]:
        return [a.uri for a in self.manifest.images]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class TemplateStore:
    """Template versions in one bucket. Thread-safe as far as the boto3 client is (one per process is fine)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # --- reading --------------------------------------------------------------------------------------------------
    def read_pointer(self, tenant: str, subject: str) -> tuple[CurrentPointer, str] | None:
        """The ``current`` pointer and its ETag, or None when the subject has no committed version."""
        try:
            data, etag = self.store.get_json(layout.current_key(tenant, subject))
        except ObjectNotFoundError:
            return None
        return CurrentPointer.model_validate(data), etag

    def get_manifest(self, tenant: str, subject: str, version: int) -> VersionManifest:
        """The manifest of ``version``; raises ``ObjectNotFoundError`` if that version was never committed."""
        data, _ = self.store.get_json(layout.version_key(tenant, subject, version))
        try:
            return VersionManifest.model_validate(data)
        except ValidationError:
            raise StorageError(f"manifest {version} of {tenant}/{subject} does not validate") from None

    def _committed(self, tenant: str, subject: str, m: VersionManifest, created: bool) -> CommittedVersion:
        return CommittedVersion(m.version, m, self.store.uri(layout.version_key(tenant, subject, m.version)), created)

    def current(self, tenant: str, subject: str) -> CommittedVersion:
        """The current version (with the pointer's fence epoch); raises ``NoTemplateError`` when there is none."""
        p = self.read_pointer(tenant, subject)
        if p is None or p[0].version is None:  # none, or fence-only (a key revocation before any commit)
            raise NoTemplateError(f"no committed template for {tenant}/{subject}")
        m = self.get_manifest(tenant, subject, p[0].version)
        c = self._committed(tenant, subject, m, False)
        return CommittedVersion(c.version, m, c.manifest_uri, False, p[0].key_epoch)

    def list_versions(self, tenant: str, subject: str) -> list[int]:
        """Every committed version number, ascending."""
        return [layout.version_from_key(o.key) for o in self.store.list(layout.versions_prefix(tenant, subject))]

    def iter_subjects(self, tenant: str, start_after: str | None = None) -> Iterator[str]:
        """Subjects of ``tenant`` that have any object (listing order, i.e. sorted), after ``start_after``."""
        return self.store.list_dirs(layout.subjects_prefix(tenant), start_after=start_after)

    def load_template(self, manifest: VersionManifest) -> TemplateRecord:
        """The template record of a version, checked against the manifest's SHA-256."""
        body = self._read_artefact(manifest.template)
        return TemplateRecord.model_validate_json(body)

    def load_image(self, artefact: Artefact) -> bytes:
        return self._read_artefact(artefact)

    def _read_artefact(self, a: Artefact) -> bytes:
        body, _ = self.store.get(a.key)
        if _sha(body) != a.sha256:
            raise HashMismatchError(f"artefact {a.key} does not match its manifest hash")
        return body

    # --- idempotency ----------------------------------------------------------------------------------------------
    def _hint(self, tenant: str, subject: str, job_id: str) -> int | None:
        try:
            data, _ = self.store.get_json(layout.job_hint_key(tenant, subject, job_id))
        except ObjectNotFoundError:
            return None
        return JobHint.model_validate(data).version

    def _scan(
        self, tenant: str, subject: str, job_id: str, start: int, key_epoch: int | None = None
    ) -> tuple[VersionManifest | None, int]:
        """Walk slots from ``start``: (our manifest, its slot) or (None, first free slot). With ``key_epoch``, only a
        manifest of this job made under that epoch is ours (a fenced earlier attempt of the job is skipped)."""
        slot = start
        for _ in range(MAX_SLOTS):
            try:
                m = self.get_manifest(tenant, subject, slot)
            except ObjectNotFoundError:
                return None, slot
            if m.job_id == job_id and (key_epoch is None or m.key_epoch == key_epoch):
                return m, slot
            slot += 1
        raise StorageError(f"{tenant}/{subject}: more than {MAX_SLOTS} versions scanned")

    def find_committed(
        self, tenant: str, subject: str, job_id: str, key_epoch: int | None = None
    ) -> CommittedVersion | None:
        """The version ``job_id`` committed (under ``key_epoch`` when given), or None. Never writes; a caller that
        returns it as the job's result calls ``ensure_current`` first (a crash may have come before the move)."""
        hint = self._hint(tenant, subject, job_id)
        if hint is None:
            return None
        m, _ = self._scan(tenant, subject, job_id, hint, key_epoch)
        return None if m is None else self._committed(tenant, subject, m, False)

    def ensure_current(self, tenant: str, subject: str, c: CommittedVersion) -> None:
        """Roll the pointer forward to a found commit if needed; ``StaleKeyError`` when the fence refuses it."""
        self._advance_pointer(tenant, subject, c.manifest)

    # --- writing --------------------------------------------------------------------------------------------------
    def commit_version(
        self,
        tenant: str,
        subject: str,
        job_id: str,
        *,
        template: TemplateRecord,
        images: Sequence[bytes],
        image_ext: str = "png",
        image_content_type: str = "image/png",
        key_epoch: int | None = None,
    ) -> CommittedVersion:
        """Write artefacts, commit the next version, move ``current``. Idempotent per (``job_id``, ``key_epoch``)
        (see module doc).

        ``template`` must name the same tenant, subject and job; ``images`` are the encoded cancelable images in the
        order of ``template.image_embeddings``. ``key_epoch``: the subject key epoch the seed was derived under
        (the revocation fence; None = unfenced, for callers outside key management). Raises ``StaleKeyError`` when
        the subject's key was revoked after that epoch: nothing of this commit is current or unmarked then.
        """
        if (template.tenant, template.subject, template.job_id) != (tenant, subject, job_id):
            raise ValueError("template record does not belong to this tenant/subject/job")
        layout.job_hint_key(tenant, subject, job_id)  # validates the IDs before any write

        # The pointer must be read BEFORE the hint: a twin execution of this job that commits after our hint read
        # commits a slot above this pointer value, so starting the slot walk at pointer+1 cannot skip past it.
        p = self.read_pointer(tenant, subject)
        if key_epoch is not None and p is not None and (p[0].key_epoch or 0) > key_epoch:
            raise StaleKeyError(f"{tenant}/{subject}: key revoked while the job ran (re-derive)")
        hint = self._hint(tenant, subject, job_id)
        first_free = 1
        if hint is not None:
            m, first_free = self._scan(tenant, subject, job_id, hint, key_epoch)
            if m is not None:
                self._advance_pointer(tenant, subject, m)
                return self._committed(tenant, subject, m, False)

        # 2. artefacts
        staging = layout.staging_prefix(tenant, subject, job_id, uuid.uuid4().hex)
        written: list[str] = []
        arts: list[Artefact] = []
        for i, img in enumerate(images):
            k = layout.image_key(staging, i, image_ext)
            self.store.put(k, img, content_type=image_content_type)
            written.append(k)
            arts.append(
                Artefact(key=k, uri=self.store.uri(k), sha256=_sha(img), size=len(img), content_type=image_content_type)
            )
        tbody = template.model_dump_json().encode()
        tk = layout.template_key(staging)
        self.store.put(tk, tbody, content_type="application/json")
        written.append(tk)
        tart = Artefact(
            key=tk, uri=self.store.uri(tk), sha256=_sha(tbody), size=len(tbody), content_type="application/json"
        )

        # 3. claim a slot, walking up from where neither this job nor its twins can have committed below
        slot = max(first_free, ((p[0].version or 0) + 1) if p else 1)
        for _ in range(MAX_SLOTS):
            manifest = VersionManifest(
                tenant=tenant,
                subject=subject,
                version=slot,
                job_id=job_id,
                key_id=template.key_id,
                key_version=template.key_version,
                key_epoch=key_epoch,
                bundle_id=template.bundle_id,
                template=tart,
                images=arts,
                source_images=template.source_images,
                committed_at=utcnow(),
            )
            self.store.put_json(layout.job_hint_key(tenant, subject, job_id), JobHint(job_id=job_id, version=slot))
            try:
                self.store.put_json(layout.version_key(tenant, subject, slot), manifest, if_none_match=True)
            except VersionConflictError:
                other = self.get_manifest(tenant, subject, slot)
                if other.job_id != job_id or other.key_epoch != key_epoch:
                    slot += 1
                    continue
                # a concurrent execution of the same job committed first: ours is an orphan
                self._delete_quietly(written)
                self._advance_pointer(tenant, subject, other)
                return self._committed(tenant, subject, other, False)
            self._advance_pointer(tenant, subject, manifest)
            log.info("committed version", extra={"tenant": tenant, "subject": subject, "version": slot})
            return self._committed(tenant, subject, manifest, True)
        raise StorageError(f"{tenant}/{subject}: no free version slot after {MAX_SLOTS} tries")

    def _advance_pointer(self, tenant: str, subject: str, m: VersionManifest) -> None:
        """Move ``current`` to ``m`` unless it already points there or later in (key epoch, version) order.

        The fence: when the pointer's epoch is above ``m.key_epoch`` the move is refused, ``m`` is marked revoked
        (``FENCED``) and ``StaleKeyError`` raised. The check and the move are one conditional PUT (If-Match), so a
        fence raised between our read and our write makes the write fail and the loop re-read it.
        """
        key = layout.current_key(tenant, subject)
        for _ in range(POINTER_TRIES):
            p = self.read_pointer(tenant, subject)
            ours = m.key_epoch
            theirs = p[0].key_epoch if p is not None else None
            if ours is not None and theirs is not None and ours < theirs:
                self.mark_revoked(tenant, subject, m.version, reason=FENCED, job_id=m.job_id)
                raise StaleKeyError(f"{tenant}/{subject}: key revoked while the job ran (re-derive)")
            newer_epoch = ours is not None and (theirs is None or ours > theirs)
            if p is not None and (p[0].version or 0) >= m.version and not newer_epoch:
                return
            new = CurrentPointer(
                version=m.version,
                manifest_key=layout.version_key(tenant, subject, m.version),
                job_id=m.job_id,
                key_epoch=ours if ours is not None else theirs,
            )
            try:
                if p is None:
                    self.store.put_json(key, new, if_none_match=True)
                else:
                    self.store.put_json(key, new, if_match=p[1])
            except VersionConflictError:
                continue
            KeyIndex(self.store).committed(tenant, m.key_id, subject)  # the key's index: this subject is committed
            return
        raise VersionConflictError(f"{tenant}/{subject}: current pointer kept changing ({POINTER_TRIES} tries)")

    def raise_fence(
        self, tenant: str, subject: str, key_epoch: int, *, fence_job: str | None = None
    ) -> CurrentPointer | None:
        """Raise the pointer's key epoch to ``key_epoch`` (never lowers it). From then on no commit derived under
        an older epoch can become current. Returns the pointer as it now stands, or None when the subject has no
        pointer (nothing to fence).

        ``fence_job``: where there is no pointer, create a fence-only one (no version, ``job_id`` = ``fence_job``)
        with ``If-None-Match``, racing the first commit's own ``If-None-Match`` pointer write: exactly one wins. If
        the commit won, its pointer is fenced like any other (and returned with its version)."""
        key = layout.current_key(tenant, subject)
        for _ in range(POINTER_TRIES):
            p = self.read_pointer(tenant, subject)
            if p is None:
                if fence_job is None:
                    return None
                fence = CurrentPointer(job_id=fence_job, key_epoch=key_epoch)
                try:
                    self.store.put_json(key, fence, if_none_match=True)
                    return fence
                except VersionConflictError:
                    continue  # the first commit moved the pointer meanwhile: fence that one
            if (p[0].key_epoch or 0) >= key_epoch:
                return p[0]
            raised = p[0].model_copy(update={"key_epoch": key_epoch})
            try:
                self.store.put_json(key, raised, if_match=p[1])
                return raised
            except VersionConflictError:
                continue
        raise VersionConflictError(f"{tenant}/{subject}: current pointer kept changing ({POINTER_TRIES} tries)")

    def _delete_quietly(self, keys: Sequence[str]) -> None:
        for k in keys:
            try:
                self.store.delete(k)
            except StorageError:
                log.warning("could not delete orphan artefact", extra={"key": k})

    # --- housekeeping ---------------------------------------------------------------------------------------------
    def sweep_staging(self, tenant: str, subject: str, *, older_than_s: float) -> int:
        """Delete staged objects that no manifest names and that are older than ``older_than_s`` seconds (left by a
        crash between artefacts and manifest, or by the loser of a duplicate race). Returns the number deleted.

        ``older_than_s`` must exceed the longest a commit can take (use the visibility timeout), so that artefacts of
        a commit still in flight are never swept. Never touches anything a committed manifest points at.
        """
        if older_than_s <= 0:
            raise ValueError("older_than_s must be positive")
        named: set[str] = set()
        for v in self.list_versions(tenant, subject):
            m = self.get_manifest(tenant, subject, v)
            named.update([m.template.key, *(a.key for a in m.images)])
        now = utcnow()
        n = 0
        for o in self.store.list(layout.subject_prefix(tenant, subject) + "staging/"):
            if o.key in named or o.last_modified is None:
                continue
            if (now - o.last_modified).total_seconds() < older_than_s:
                continue
            self.store.delete(o.key)
            n += 1
        return n

    def sweep_all_staging(self, *, older_than_s: float, tenant: str | None = None) -> tuple[int, int]:
        """``sweep_staging`` over every subject that has a staging area (of one tenant, or of all).

        Returns (subjects swept, objects deleted). Walks the bucket with delimiter listings, so its cost grows with
        the number of subjects; meant for a periodic job (the ``sweep_staging`` control task under Celery beat).
        """
        tenants = [tenant] if tenant is not None else list(self.store.list_dirs("tenants/"))
        swept = deleted = 0
        for t in tenants:
            for subject in self.store.list_dirs(layout.subjects_prefix(t)):
                if "staging" not in set(self.store.list_dirs(layout.subject_prefix(t, subject))):
                    continue
                deleted += self.sweep_staging(t, subject, older_than_s=older_than_s)
                swept += 1
        return swept, deleted

    # --- revocation -----------------------------------------------------------------------------------------------
    def revocation(self, tenant: str, subject: str, version: int) -> RevocationRecord | None:
        try:
            data, _ = self.store.get_json(layout.revocation_key(tenant, subject, version))
        except ObjectNotFoundError:
            return None
        return RevocationRecord.model_validate(data)

    def is_revoked(self, tenant: str, subject: str, version: int) -> bool:
        return self.store.exists(layout.revocation_key(tenant, subject, version))

    def mark_revoked(
        self, tenant: str, subject: str, version: int, *, reason: str, job_id: str, replaced_by: int | None = None
    ) -> RevocationRecord:
        """Record that ``version`` is revoked (write-once: a repeat returns the first record)."""
        m = self.get_manifest(tenant, subject, version)
        rec = RevocationRecord(
            tenant=tenant,
            subject=subject,
            version=version,
            key_id=m.key_id,
            key_version=m.key_version,
            reason=reason,
            job_id=job_id,
            replaced_by=replaced_by,
        )
        try:
            self.store.put_json(layout.revocation_key(tenant, subject, version), rec, if_none_match=True)
            return rec
        except VersionConflictError:
            existing = self.revocation(tenant, subject, version)
            assert existing is not None
            return existing

    def purge_images(self, tenant: str, subject: str, version: int) -> int:
        """Delete a *revoked* version's cancelable images (policy); the manifest and template stay as the audit
        record. Returns the number of objects deleted. Refuses versions that are not revoked."""
        rec = self.revocation(tenant, subject, version)
        if rec is None:
            raise VersionConflictError(f"{tenant}/{subject} version {version} is not revoked; refusing to purge")
        m = self.get_manifest(tenant, subject, version)
        n = 0
        for a in m.images:
            self.store.delete(a.key)
            n += 1
        if not rec.images_purged:
            rec = rec.model_copy(update={"images_purged": True})
            self.store.put_json(layout.revocation_key(tenant, subject, version), rec)
        return n
