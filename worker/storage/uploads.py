"""Expiry of uploaded source photos in the input bucket.

``cancelable`` (the CLI) uploads a user's local photos to ``s3://<input bucket>/tenants/<tenant>/uploads/`` under
their content hash (``worker.storage.layout.upload_key``). A job reads them once; they are original face photos, so
they must not outlive their use: the ``sweep_uploads`` control task (Celery beat, ``worker.upload_retention``)
deletes every such upload older than the retention, whether its job succeeded, failed or was never queued. Objects a
producer put anywhere else in the input bucket are its own and never touched.
"""

from __future__ import annotations

import re
from datetime import datetime

from worker.storage.client import ObjectStore
from worker.storage.records import utcnow

# exactly what ``layout.upload_key`` names: tenants/<tenant>/uploads/<32 hex>.<ext>
UPLOAD_KEY = re.compile(r"tenants/[^/]+/uploads/[0-9a-f]{32}\.[a-z0-9]+")


def sweep_uploads(
    store: ObjectStore, input_bucket: str, *, older_than_s: float, now: datetime | None = None
) -> tuple[int, int]:
    """Delete the CLI's uploads in ``input_bucket`` last modified more than ``older_than_s`` seconds before ``now``.
    Returns (uploads seen, uploads deleted). One paginated listing of ``tenants/``: constant memory per page."""
    if older_than_s < 0:
        raise ValueError("older_than_s must be >= 0")
    now = now or utcnow()
    seen, old = 0, []
    deleted = 0
    for o in store.list("tenants/", bucket=input_bucket):
        if not UPLOAD_KEY.fullmatch(o.key):
            continue
        seen += 1
        if o.last_modified is not None and (now - o.last_modified).total_seconds() >= older_than_s:
            old.append(o.key)
        if len(old) >= 1000:
            store.delete_many(input_bucket, old)
            deleted, old = deleted + len(old), []
    if old:
        store.delete_many(input_bucket, old)
        deleted += len(old)
    return seen, deleted
