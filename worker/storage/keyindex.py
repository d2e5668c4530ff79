"""Per-(tenant, key) subject index, and the listing of a key's subjects that a key revocation re-enrols.

A key revocation must find every subject of the tenant whose ``key.json`` names the key (or that this revocation
already moved off it), and tell those with a committed version (reissued) from those without one yet (fenced: a
first enrolment may be in flight; ``worker.service.revoke``). Reading two objects per subject (``key.json`` and
``current.json``) costs ~2 x 1.5 ms of client CPU per subject on this project's reference machine, so 10,000 subjects
take ~50 s; the index answers the same question from LIST pages (1,000 markers each) for the common case.

S3 stays the source of truth: the index is a set of empty marker objects, written by the code that changes
``key.json`` (``worker.keys.registry.KeyRegistry``) and ``current.json`` (``TemplateStore``), in an order such that
every crash window leaves the index *undecided*, never wrong, and an undecided subject is read from its records
exactly as before. Markers are never deleted, except by an erasure (``worker.storage.erasure``), which deletes
every record of the subject: markers, key.json and pointer alike.

    tenants/{tenant}/keys/{key}/subjects/{subject}~p        pending: written BEFORE a key.json write that names the
                                                             key (first enrolment, or a revocation moving onto it)
    tenants/{tenant}/keys/{key}/subjects/{subject}~d.{job}  departing: written BEFORE revocation ``job`` moves the
                                                             subject's key.json off the key (``new_key_id``)
    tenants/{tenant}/keys/{key}/subjects/{subject}~c        committed: written AFTER ``current.json`` moved to a
                                                             version made under the key (pointers are never deleted)
    tenants/{tenant}/keys/{key}/index.json                  the index is complete for this tenant and key
    tenants/{tenant}/keys/~index.json                       ... for every key of this tenant

Why the answer is the records' answer:

- Complete: every key.json write naming the key is preceded by ``p``, so every subject under the key is listed.
- ``c`` and no departure by another job => under the key with a committed version. A version made under the key
  means its seed was derived while key.json named the key (``ensure_subject_key`` refuses another key; a
  revocation derives under the key it just moved to); the only way off a key is a revocation with ``new_key_id``,
  which writes ``d.{job}`` first; a departure by this very job counts as under the key (the record check includes
  subjects this job moved, through their history); and ``current.json`` is never deleted.
- Anything else (``p`` only: an enrolment not committed, or a crash between a marker and the write it announces; a
  departure by another job) is read from S3: the subject's key.json, then its pointer (a fence-only pointer, see
  ``worker.storage.templates``, is no committed version).

So a normal subject costs two markers in a LIST page (1,000 keys each) and no GET. The index is used only where it
is marked complete: for a tenant with subjects from before index-aware writers, run ``backfill_key_index`` (one key,
or all keys of the tenant at once) after every worker runs index-aware code (writers that change key.json during
the backfill write their markers themselves). Without it, the listing reads every subject's records, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

from worker.errors import ObjectNotFoundError, StorageError
from worker.storage import layout
from worker.storage.client import ObjectStore
from worker.storage.records import SubjectKeyRecord, utcnow

log = logging.getLogger(__name__)

PENDING, COMMITTED, DEPARTING = "p", "c", "d."
READ_THREADS = 16  # concurrent per-subject reads (boto3 clients are thread-safe; the pool holds 32 connections)
PAGE = 256  # subjects decided per round of concurrent reads


@dataclass(frozen=True)
class IndexEntry:
    """One subject's markers in a key's index."""

    subject: str
    kinds: frozenset[str]
    departures: frozenset[str]  # job IDs of ``d.{job}`` markers

    def decided(self, job_id: str | None) -> bool:
        """Under the key with a committed version, from the index alone (else: read the subject's records)."""
        return COMMITTED in self.kinds and self.departures <= {job_id}


class KeyIndex:
    """Writes and reads the markers of ``tenants/{tenant}/keys/{key}/subjects/``."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def _mark(self, tenant: str, key_id: str, subject: str, kind: str) -> None:
        self.store.put(layout.key_index_marker(tenant, key_id, subject, kind), b"")

    def pending(self, tenant: str, key_id: str, subject: str) -> None:
        """Before a key.json write that puts ``subject`` under ``key_id`` (must succeed first: completeness)."""
        self._mark(tenant, key_id, subject, PENDING)

    def departing(self, tenant: str, key_id: str, subject: str, job_id: str) -> None:
        """Before revocation ``job_id`` moves ``subject`` off ``key_id`` (must succeed first: soundness)."""
        self._mark(tenant, key_id, subject, DEPARTING + job_id)

    def committed(self, tenant: str, key_id: str, subject: str) -> None:
        """After ``current.json`` moved to a version made under ``key_id``. Best effort: without it the subject is
        read from its records when the key is revoked."""
        try:
            self._mark(tenant, key_id, subject, COMMITTED)
        except StorageError as e:
            log.warning("key index marker not written (the subject will be read instead): %s", e)

    def is_complete(self, tenant: str, key_id: str) -> bool:
        """The key's index lists every subject under it: that key, or every key of the tenant, was marked."""
        return self.store.exists(layout.key_index_state(tenant, key_id)) or self.store.exists(
            layout.tenant_key_index_state(tenant)
        )

    def mark_complete(self, tenant: str, key_id: str | None, *, subjects: int | None = None) -> None:
        """Mark ``key_id``'s index complete, or (None) every key's of the tenant, present and future: once every
        subject's current key is indexed and every writer is index-aware, a key can only gain subjects through
        writers that mark them."""
        key = layout.tenant_key_index_state(tenant) if key_id is None else layout.key_index_state(tenant, key_id)
        record = {"kind": "key_index", "key_id": key_id, "complete": True, "since": utcnow().isoformat()}
        self.store.put_json(key, {**record, "backfilled_subjects": subjects})

    def entries(self, tenant: str, key_id: str, start_after: str | None = None) -> Iterator[IndexEntry]:
        """The index's subjects in listing order (grouped markers), after subject ``start_after``."""
        prefix = layout.key_index_prefix(tenant, key_id)
        after = None if start_after is None else f"{prefix}{start_after}{layout.INDEX_SEP}\uffff"
        subject: str | None = None
        kinds: set[str] = set()
        departures: set[str] = set()
        for o in self.store.list(prefix, start_after=after):
            name, _, kind = o.key[len(prefix) :].partition(layout.INDEX_SEP)
            if name != subject:
                if subject is not None:
                    yield IndexEntry(subject, frozenset(kinds), frozenset(departures))
                subject, kinds, departures = name, set(), set()
            if kind.startswith(DEPARTING):
                departures.add(kind[len(DEPARTING) :])
            else:
                kinds.add(kind)
        if subject is not None:
            yield IndexEntry(subject, frozenset(kinds), frozenset(departures))


def subject_key_record(store: ObjectStore, tenant: str, subject: str) -> SubjectKeyRecord | None:
    try:
        data, _ = store.get_json(layout.subject_key_state(tenant, subject))
    except ObjectNotFoundError:
        return None
    return SubjectKeyRecord.model_validate(data)


COMMITTED_UNDER, UNCOMMITTED_UNDER = "committed", "uncommitted"
"""How a listed subject stands under the key: under it with a committed version (to reissue), or under it with none
yet (its first enrolment may be in flight: the revocation fences it)."""


def has_version(store: ObjectStore, tenant: str, subject: str) -> bool:
    """The subject has a committed version: a pointer that names one (a fence-only pointer names none)."""
    try:
        data, _ = store.get_json(layout.current_key(tenant, subject))
    except ObjectNotFoundError:
        return False
    return isinstance(data, dict) and data.get("version") is not None


def standing_under_key(store: ObjectStore, tenant: str, subject: str, key_id: str, job_id: str | None) -> str | None:
    """From the records: ``COMMITTED_UNDER`` / ``UNCOMMITTED_UNDER`` when ``subject``'s key.json names ``key_id`` (or
    revocation ``job_id`` moved it off that key), with or without a committed version; None otherwise. Two
    requests."""
    rec = subject_key_record(store, tenant, subject)
    if rec is None:
        return None
    if rec.key_id != key_id and not any(h.get("job_id") == job_id for h in rec.history):
        return None
    return COMMITTED_UNDER if has_version(store, tenant, subject) else UNCOMMITTED_UNDER


def subjects_under_key(
    store: ObjectStore,
    tenant: str,
    key_id: str,
    job_id: str | None,
    start_after: str | None = None,
    *,
    use_index: bool,
    threads: int = READ_THREADS,
) -> Iterator[tuple[str, str | None]]:
    """(subject, standing) for every subject that may be under ``key_id``, in listing order after ``start_after`` (a
    cursor from the same mode); standing as ``standing_under_key``. ``use_index``: from the key's index (only where
    it is complete), reading only the subjects it leaves undecided; otherwise every subject of the tenant, each read
    from S3. Reads run ``threads`` at a time; results come back in listing order."""
    items: Iterator[tuple[str, bool]]
    if use_index:
        items = ((e.subject, e.decided(job_id)) for e in KeyIndex(store).entries(tenant, key_id, start_after))
    else:
        names = store.list_dirs(layout.subjects_prefix(tenant), start_after=start_after)
        items = ((n, False) for n in names)
    pool: ThreadPoolExecutor | None = None
    try:
        while True:
            page = list(islice(items, PAGE if use_index else threads * 4))
            if not page:
                return
            reads: list[Future[str | None] | None] = []
            for subject, decided in page:
                if decided:
                    reads.append(None)
                    continue
                if pool is None:
                    pool = ThreadPoolExecutor(threads)
                reads.append(pool.submit(standing_under_key, store, tenant, subject, key_id, job_id))
            for (subject, _), fut in zip(page, reads, strict=True):
                yield subject, COMMITTED_UNDER if fut is None else fut.result()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def backfill_key_index(
    store: ObjectStore, tenant: str, key_id: str | None = None, *, threads: int = READ_THREADS
) -> int:
    """Build the index from the records: for each subject whose key.json names ``key_id`` (None: any key), ``p``
    under that key and, where a pointer exists, ``c``; then mark ``key_id``'s index (None: every key of the tenant,
    including keys no subject uses yet) complete. Run it once every writer is index-aware; safe to run again.
    Returns the number of subjects indexed."""
    index = KeyIndex(store)

    def one(subject: str) -> int:
        rec = subject_key_record(store, tenant, subject)
        if rec is None or (key_id is not None and rec.key_id != key_id):
            return 0
        index.pending(tenant, rec.key_id, subject)
        if has_version(store, tenant, subject):
            index.committed(tenant, rec.key_id, subject)
        return 1

    n = 0
    names = store.list_dirs(layout.subjects_prefix(tenant))
    with ThreadPoolExecutor(threads) as pool:
        while page := list(islice(names, threads * 4)):
            n += sum(pool.map(one, page))
    index.mark_complete(tenant, key_id, subjects=n)
    log.info("key index built", extra={"tenant": tenant, "subjects": n})
    return n


__all__ = [
    "IndexEntry",
    "KeyIndex",
    "backfill_key_index",
    "COMMITTED_UNDER",
    "UNCOMMITTED_UNDER",
    "has_version",
    "standing_under_key",
    "subject_key_record",
    "subjects_under_key",
]
