"""The report of a bulk job: every failed row with its manifest line, subject, error code and message, written to
S3 as JSONL and CSV under the job (``tenants/{tenant}/jobs/{job_id}/report.jsonl|csv``, sorted by line).

Rows refused while the manifest was read keep their details in the job book from the start; a failed enrolment
child stores its subject, code and message when it reports, and its line is found again from its child job ID
(``child_job_id(parent, "line", n)``, walking the lines up to the last one a child can name). Only IDs, codes and
messages are written: never key material, embeddings or image bytes.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

from worker.contracts import child_job_id, job_ref
from worker.storage.layout import job_report_key

if TYPE_CHECKING:
    from worker.service.runtime import Runtime

REPORT_FIELDS = ("line", "subject", "code", "message", "job_id")
_LINES_PER_STEP = 1000


def _lines_of(parent_job_id: str, child_ids: set[str], last_line: int) -> dict[str, int]:
    """child ID -> manifest line, for the children in ``child_ids`` (stops once all are found)."""
    found: dict[str, int] = {}
    for n in range(1, last_line + 1):
        cid = child_job_id(parent_job_id, "line", n)
        if cid in child_ids:
            found[cid] = n
            if len(found) == len(child_ids):
                break
    return found


def report_rows(rt: Runtime, tenant: str, parent_job_id: str) -> list[dict[str, Any]]:
    """Every failed row of the bulk job, sorted by line (a row whose line cannot be found comes last)."""
    book = rt.book
    pref = job_ref(tenant, parent_job_id)  # the job book's key; child IDs inside it are plain
    codes = book.failures(pref, limit=10**9)
    ids = list(codes)
    details: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), _LINES_PER_STEP):
        details.update(book.error_details(pref, ids[i : i + _LINES_PER_STEP]))
    missing = {cid for cid in ids if details.get(cid, {}).get("line") is None}
    lines = {}
    if missing:
        last = int(book.get_fields(pref).get("last_line") or 0)
        lines = _lines_of(parent_job_id, missing, last)
    rows = []
    for cid in ids:
        d = details.get(cid, {})
        rows.append(
            {
                "line": d.get("line") or lines.get(cid),
                "subject": d.get("subject"),
                "code": codes[cid],
                "message": d.get("message") or "",
                "job_id": cid,
            }
        )
    rows.sort(key=lambda r: (r["line"] is None, r["line"] or 0, r["job_id"]))
    return rows


def write_bulk_report(rt: Runtime, parent_job_id: str, tenant: str) -> str:
    """Write the JSONL and CSV reports (an empty report when nothing failed); returns the JSONL's ``s3://`` URI."""
    rows = report_rows(rt, tenant, parent_job_id)
    jsonl = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=REPORT_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    key = job_report_key(tenant, parent_job_id, "jsonl")
    rt.store.put(job_report_key(tenant, parent_job_id, "csv"), buf.getvalue().encode("utf-8"), content_type="text/csv")
    rt.store.put(key, jsonl, content_type="application/x-ndjson")
    return rt.store.uri(key)
