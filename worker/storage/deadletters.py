"""Dead-letter records in S3 (the Redis side belongs to the tasks). Idempotent: one record per job ID, the last
write wins (it carries the final attempt count)."""

from __future__ import annotations

from collections.abc import Iterator

from worker.errors import ObjectNotFoundError
from worker.storage import layout
from worker.storage.client import ObjectStore
from worker.storage.records import DeadLetter


def write_dead_letter(store: ObjectStore, record: DeadLetter) -> str:
    """Store ``record`` at ``tenants/{tenant}/dead-letters/{job_id}.json``; returns its s3:// URI."""
    key = layout.dead_letter_key(record.tenant, record.job_id)
    store.put_json(key, record)
    return store.uri(key)


def read_dead_letter(store: ObjectStore, tenant: str, job_id: str) -> DeadLetter | None:
    try:
        data, _ = store.get_json(layout.dead_letter_key(tenant, job_id))
    except ObjectNotFoundError:
        return None
    return DeadLetter.model_validate(data)


def iter_dead_letters(store: ObjectStore, tenant: str) -> Iterator[str]:
    """Job IDs with a dead letter under ``tenant``."""
    prefix = layout.dead_letters_prefix(tenant)
    for o in store.list(prefix):
        name = o.key[len(prefix) :]
        if name.endswith(".json") and "/" not in name:
            yield name[: -len(".json")]
