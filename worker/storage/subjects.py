"""What is stored about one subject, read-only (``cancelable subject --tenant T --subject S``).

Reads the ``current`` pointer and its manifest, the version list, the revocation records and the subject key record
(``key.json``) plus that key's state. Nothing here writes; no key material or embedding is read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from worker.errors import ObjectNotFoundError
from worker.storage import layout
from worker.storage.client import ObjectStore
from worker.storage.records import KeyStateRecord, RevocationRecord, SubjectKeyRecord
from worker.storage.templates import TemplateStore


@dataclass(frozen=True)
class RevokedVersion:
    version: int
    key_id: str
    key_version: int
    reason: str
    revoked_at: str
    replaced_by: int | None
    images_purged: bool


@dataclass(frozen=True)
class SubjectState:
    """One subject. ``current_*`` describe the version verify uses; ``key_id``/``key_version`` the key the subject's
    next template is derived under (they differ from the current version's only while a reissue is in flight)."""

    tenant: str
    subject: str
    current_version: int | None
    current_key_id: str | None
    current_key_version: int | None
    current_committed_at: str | None
    current_manifest_uri: str | None
    key_id: str | None
    key_version: int | None
    key_revoked: bool
    versions: list[int] = field(default_factory=list)
    revoked: list[RevokedVersion] = field(default_factory=list)

    @property
    def revoked_versions(self) -> list[int]:
        return [r.version for r in self.revoked]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "revoked_versions": self.revoked_versions}


def _json(store: ObjectStore, key: str) -> Any | None:
    try:
        return store.get_json(key)[0]
    except ObjectNotFoundError:
        return None


def read_subject(store: ObjectStore, tenant: str, subject: str) -> SubjectState | None:
    """The subject's state, or None when nothing is stored for it (never enrolled)."""
    ts = TemplateStore(store)
    versions = ts.list_versions(tenant, subject)
    key_data = _json(store, layout.subject_key_state(tenant, subject))
    pointer = ts.read_pointer(tenant, subject)
    if not versions and key_data is None and pointer is None:
        return None
    key_rec = SubjectKeyRecord.model_validate(key_data) if key_data is not None else None
    key_revoked = False
    if key_rec is not None:
        st = _json(store, layout.key_state_key(tenant, key_rec.key_id))
        key_revoked = st is not None and KeyStateRecord.model_validate(st).state == "revoked"
    version = pointer[0].version if pointer is not None else None  # None: nothing, or fence-only (no version yet)
    cur = ts.get_manifest(tenant, subject, version) if version is not None else None
    revoked = []
    for o in store.list(layout.revocations_prefix(tenant, subject)):
        data = _json(store, o.key)
        if data is None:
            continue
        r = RevocationRecord.model_validate(data)
        revoked.append(
            RevokedVersion(
                r.version, r.key_id, r.key_version, r.reason, r.revoked_at.isoformat(), r.replaced_by, r.images_purged
            )
        )
    return SubjectState(
        tenant=tenant,
        subject=subject,
        current_version=cur.version if cur else None,
        current_key_id=cur.key_id if cur else None,
        current_key_version=cur.key_version if cur else None,
        current_committed_at=cur.committed_at.isoformat() if cur else None,
        current_manifest_uri=store.uri(layout.version_key(tenant, subject, cur.version)) if cur else None,
        key_id=key_rec.key_id if key_rec else None,
        key_version=key_rec.key_version if key_rec else None,
        key_revoked=key_revoked,
        versions=versions,
        revoked=sorted(revoked, key=lambda r: r.version),
    )
