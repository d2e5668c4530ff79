"""Bulk manifest rows: pure streaming parsers (constant memory) shared by the producer and the bulk task.

They take an iterable of text lines (or, for prefixes, of object keys) and yield one ``ManifestRow`` per subject.
Bad rows raise ``ManifestRowError`` carrying the 1-based line number; callers decide to skip or stop.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.contracts.ids import KeyId, SubjectId
from worker.contracts.jobs import MAX_IMAGES_PER_JOB
from worker.contracts.refs import S3Ref


class ManifestRowError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"manifest line {line}: {message}")
        self.line = line


class ManifestRow(BaseModel):
    """One subject to enrol. ``line`` is where the row started (1-based; for prefixes the object index)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: int
    subject: SubjectId
    images: list[S3Ref] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB)
    key_id: KeyId | None = None


def _row(line: int, subject: str, images: list[str], key_id: str | None) -> ManifestRow:
    try:
        return ManifestRow(line=line, subject=subject, images=images, key_id=key_id)  # type: ignore[arg-type]
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors(include_input=False))
        raise ManifestRowError(line, msg) from None


def iter_jsonl(lines: Iterable[str]) -> Iterator[ManifestRow]:
    for n, raw in enumerate(lines, start=1):
        s = raw.strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise ManifestRowError(n, f"not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or set(obj) - {"subject", "images", "key_id"}:
            raise ManifestRowError(n, "expected an object with subject, images[, key_id] only")
        images = obj.get("images")
        if not isinstance(images, list):
            raise ManifestRowError(n, "images must be a list of s3:// refs")
        yield _row(n, obj.get("subject"), images, obj.get("key_id"))  # type: ignore[arg-type]  # validated there


def iter_csv(lines: Iterable[str]) -> Iterator[ManifestRow]:
    """Header ``subject,image[,key_id]``; consecutive rows of one subject become one row."""
    reader = csv.reader(lines)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        return
    if header[:2] != ["subject", "image"] or header[2:] not in ([], ["key_id"]):
        raise ManifestRowError(1, "header must be subject,image[,key_id]")
    cur: tuple[int, str, list[str], str | None] | None = None
    for rec in reader:
        n = reader.line_num
        if not rec or all(not c.strip() for c in rec):
            continue
        if len(rec) != len(header):
            raise ManifestRowError(n, f"expected {len(header)} columns, got {len(rec)}")
        subject, image = rec[0].strip(), rec[1].strip()
        key_id = rec[2].strip() or None if len(rec) > 2 else None
        if cur is not None and cur[1] == subject and cur[3] == key_id and len(cur[2]) < MAX_IMAGES_PER_JOB:
            cur[2].append(image)
            continue
        if cur is not None:
            yield _row(*cur)
        cur = (n, subject, [image], key_id)
    if cur is not None:
        yield _row(*cur)


def iter_prefix(bucket: str, prefix: str, keys: Iterable[str], rule: re.Pattern[str]) -> Iterator[ManifestRow]:
    """Group listed object keys (in listing order, i.e. sorted) by the ``subject`` group of ``rule`` matched against
    the key relative to ``prefix``. Keys that do not match are skipped."""
    cur: tuple[int, str, list[str], str | None] | None = None
    for n, key in enumerate(keys, start=1):
        rel = key[len(prefix) :] if key.startswith(prefix) else key
        m = rule.match(rel)
        if not m:
            continue
        subject = m.group("subject")
        uri = f"s3://{bucket}/{key}"
        if cur is not None and cur[1] == subject and len(cur[2]) < MAX_IMAGES_PER_JOB:
            cur[2].append(uri)
            continue
        if cur is not None:
            yield _row(*cur)
        cur = (n, subject, [uri], None)
    if cur is not None:
        yield _row(*cur)
