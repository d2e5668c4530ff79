"""Model bundles on S3: sync ``s3://bucket/prefix/`` to a local cache directory once per worker process.

The cache entry is ``{cache_dir}/{bucket}/{prefix}`` and is replaced atomically (download into a temporary sibling,
then rename), so a worker that dies mid-download never leaves a half bundle that looks complete. An entry is reused
when its recorded listing (keys, sizes, ETags) equals the current listing. SHA-256 checks of the checkpoints are the
bundle loader's job (``worker.models.bundle``), against the bundle manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from worker.contracts.refs import S3Prefix
from worker.errors import BundleError
from worker.storage.client import ObjectStore

LISTING = ".s3-listing.json"
MAX_BUNDLE_BYTES = 20 * 1024**3


def sync_bundle(uri: str, cache_dir: Path, store: ObjectStore) -> Path:
    """Mirror every object under the ``s3://`` prefix ``uri`` into the cache; return the local directory.

    Object keys become relative paths below the prefix; keys that would escape it (``..``) are refused.
    Raises ``BundleError`` for an empty prefix and ``StorageError`` for S3 faults.
    """
    ref = S3Prefix.model_validate(uri if uri.endswith("/") else uri + "/")
    objs = [o for o in store.list(ref.prefix, bucket=ref.bucket) if not o.key.endswith("/")]
    if not objs:
        raise BundleError(f"no objects under {ref.uri}")
    if sum(o.size for o in objs) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle under {ref.uri} is larger than {MAX_BUNDLE_BYTES} bytes")
    listing: list[tuple[str, int, str]] = sorted((o.key[len(ref.prefix) :], o.size, o.etag) for o in objs)
    dest = Path(cache_dir) / ref.bucket / ref.prefix.strip("/")
    marker = dest / LISTING
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == [list(x) for x in listing]:
                return dest
        except ValueError:
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for rel, size, _ in listing:
            parts = Path(rel).parts
            if not parts or any(p in ("..", ".") for p in parts) or Path(rel).is_absolute():
                raise BundleError(f"bundle object key {rel!r} escapes the prefix")
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            body, _ = store.get_object(ref.bucket, ref.prefix + rel)
            if len(body) != size:
                raise BundleError(f"{rel}: size changed during sync")
            out.write_bytes(body)
        (tmp / LISTING).write_text(json.dumps(listing))
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
