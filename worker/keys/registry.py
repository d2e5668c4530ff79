"""Key state and per-subject key versions in S3 (``KeyRegistry``), shared by every worker.

Revoking a subject bumps its key version, revoking a key marks it revoked for a tenant; both record reason, job and
time. Updates are compare-and-set with conditional PutObject. The providers (``worker.keys.providers``) consult it to
refuse revoked keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.contracts.ids import check_key_id, check_name
from worker.errors import KeyError_, ObjectNotFoundError, VersionConflictError
from worker.storage import layout
from worker.storage.keyindex import KeyIndex
from worker.storage.records import KeyStateRecord, SubjectKeyRecord, utcnow

if TYPE_CHECKING:
    from worker.storage.client import ObjectStore

CAS_TRIES = 20


class KeyRegistry:
    """Key states (``keys/{key_id}/state.json``) and subject key versions (``.../subjects/{s}/key.json``) in S3.

    Updates are compare-and-set with conditional PutObject, so concurrent revocations of one subject bump the
    version once per job, not once per writer.
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # key state, per tenant: a tenant's revocation of a key never touches another tenant's use of the same key ID
    def key_state(self, tenant: str, key_id: str) -> KeyStateRecord | None:
        """The recorded state of ``key_id`` for ``tenant``, or None when never revoked (active unless recorded)."""
        try:
            data, _ = self.store.get_json(layout.key_state_key(tenant, key_id))
        except ObjectNotFoundError:
            return None
        return KeyStateRecord.model_validate(data)

    def is_revoked(self, tenant: str, key_id: str) -> bool:
        st = self.key_state(tenant, key_id)
        return st is not None and st.state == "revoked"

    def revoke_key(self, tenant: str, key_id: str, *, reason: str, job_id: str) -> KeyStateRecord:
        """Mark ``key_id`` revoked for ``tenant`` (write-once: a repeat returns the first record)."""
        rec = KeyStateRecord(
            tenant=check_name(tenant, "tenant"),
            key_id=check_key_id(key_id),
            state="revoked",
            reason=reason,
            job_id=job_id,
        )
        try:
            self.store.put_json(layout.key_state_key(tenant, key_id), rec, if_none_match=True)
            return rec
        except VersionConflictError:
            st = self.key_state(tenant, key_id)
            assert st is not None
            return st

    # subject key versions
    def _subject(self, tenant: str, subject: str) -> tuple[SubjectKeyRecord, str] | None:
        try:
            data, etag = self.store.get_json(layout.subject_key_state(tenant, subject))
        except ObjectNotFoundError:
            return None
        return SubjectKeyRecord.model_validate(data), etag

    def subject_key(self, tenant: str, subject: str) -> SubjectKeyRecord | None:
        """The subject's current key ID and version, or None for a subject never enrolled."""
        r = self._subject(tenant, subject)
        return None if r is None else r[0]

    def ensure_subject_key(self, tenant: str, subject: str, key_id: str) -> SubjectKeyRecord:
        """For enrolment: the subject's record, created at version 1 under ``key_id`` if missing.

        Raises ``KeyError_`` when the subject is already under another key (change keys by revoking with
        ``new_key_id``, which makes the new template unlinkable to the old one).
        """
        check_name(tenant, "tenant"), check_name(subject, "subject"), check_key_id(key_id)
        for _ in range(CAS_TRIES):
            cur = self._subject(tenant, subject)
            if cur is not None:
                if cur[0].key_id != key_id:
                    raise KeyError_(
                        f"subject {tenant}/{subject} is enrolled under another key; revoke with new_key_id to change"
                    )
                return cur[0]
            rec = SubjectKeyRecord(tenant=tenant, subject=subject, key_id=key_id, key_version=1)
            KeyIndex(self.store).pending(tenant, key_id, subject)  # before the record: the key's index stays complete
            try:
                self.store.put_json(layout.subject_key_state(tenant, subject), rec, if_none_match=True)
                return rec
            except VersionConflictError:
                continue
        raise VersionConflictError(f"subject key record of {tenant}/{subject} kept changing")

    def bump_subject_key(
        self, tenant: str, subject: str, *, reason: str, job_id: str, new_key_id: str | None = None
    ) -> SubjectKeyRecord:
        """Revoke the subject's current key version: next version (under ``new_key_id`` if given, with version 1 of
        that key if the subject never used it). Idempotent per ``job_id``: a repeat returns the record as bumped."""
        for _ in range(CAS_TRIES):
            cur = self._subject(tenant, subject)
            if cur is None:
                raise KeyError_(f"subject {tenant}/{subject} has no key record to revoke")
            rec, etag = cur
            if rec.history and rec.history[-1].get("job_id") == job_id:
                return rec
            target = new_key_id or rec.key_id
            used = [h["key_version"] for h in rec.history if h.get("key_id") == target]
            if target == rec.key_id:
                used.append(rec.key_version)
            new = SubjectKeyRecord(
                tenant=tenant,
                subject=subject,
                key_id=check_key_id(target),
                key_version=max(used, default=0) + 1,
                history=[
                    *rec.history,
                    {
                        "key_id": rec.key_id,
                        "key_version": rec.key_version,
                        "reason": reason,
                        "job_id": job_id,
                        "revoked_at": utcnow().isoformat(),
                    },
                ],
            )
            if new.key_id != rec.key_id:  # before the record: the old key's index stops vouching, the new one lists
                KeyIndex(self.store).departing(tenant, rec.key_id, subject, job_id)
                KeyIndex(self.store).pending(tenant, new.key_id, subject)
            try:
                self.store.put_json(layout.subject_key_state(tenant, subject), new, if_match=etag)
                return new
            except VersionConflictError:
                continue
        raise VersionConflictError(f"subject key record of {tenant}/{subject} kept changing")
