"""Build the subject index of a tenant's keys (or one key) from the S3 records, then mark it complete, so that a
revocation of the key lists its subjects from the index (docs/storage-layout.md, "The key subject index").

Run it once per tenant that had subjects before the workers wrote index markers, after every worker runs index-aware
code; without KEY_ID every key of the tenant, present and future, is marked complete. Reads every subject of the
tenant (two requests each); safe to run again.

Run: .venv/bin/python scripts/backfill_key_index.py TENANT [KEY_ID]   (settings from CANCELABLE_*, as the workers)
"""

from __future__ import annotations

import argparse
import time

from worker.settings import get_settings
from worker.storage import ObjectStore
from worker.storage.keyindex import backfill_key_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tenant")
    ap.add_argument("key_id", nargs="?", help="one key only (default: every key of the tenant)")
    args = ap.parse_args()
    store = ObjectStore.from_settings(get_settings().s3)
    t = time.perf_counter()
    n = backfill_key_index(store, args.tenant, args.key_id)
    dt = time.perf_counter() - t
    which = f"key {args.key_id}" if args.key_id else "every key"
    print(f"key index of tenant {args.tenant}, {which}: {n} subjects indexed in {dt:.1f} s; marked complete")


if __name__ == "__main__":
    main()
