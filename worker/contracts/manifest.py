"""Bulk manifests, parsed row by row with line numbers: one pure streaming parser shared by the CLI (a local file,
checked before anything is queued) and the bulk task (an S3 object, streamed in constant memory).

Rules (``docs/operations.md``, "Bulk manifests"):

- A manifest is read one physical line at a time (``split_lines``): a line is a row, so a quote left open is an
  error at its own line and never swallows the rows after it; a line longer than ``MAX_MANIFEST_LINE`` characters
  or not UTF-8 is an error at that line (nothing of it is kept).
- CSV: header ``subject,image[,key_id]`` (a bad header refuses the whole manifest); then one image per row.
  JSONL: one ``{"subject", "images", "key_id"?}`` object per line. Prefix: one listed object per "row" (its index in
  the listing), grouped by the naming rule's ``subject`` group.
- Consecutive rows of one subject form one enrolment (``ManifestRow``, ``line`` = its first row). A bad row (bad CSV,
  wrong column count, bad subject ID, bad ``s3://`` ref, a ref already listed for the subject, a key ID other than
  the subject's first row's) is a ``ManifestRowError`` at its line and is left out; the subject's good rows still
  form its enrolment. A subject with more than ``MAX_IMAGES_PER_JOB`` images is one error (at its first row).
- A subject whose rows are not consecutive (listed again after another subject) is not merged: its later group is
  an error naming the line of the first one. The parser itself keeps no memory of earlier subjects (constant
  memory); callers decide with ``first_lines`` (the CLI, in memory) or the job book (the bulk task, in Redis).

Items come with a resume state (``State``): the (byte offset, physical lines) after which a reader starting there
produces exactly the items that follow, or None where no such point exists (an error reported while an enrolment
is still being collected).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.contracts.ids import KeyId, SubjectId, check_key_id, check_name
from worker.contracts.jobs import MAX_IMAGES_PER_JOB
from worker.contracts.refs import S3Ref, parse_s3_uri
from worker.errors import MalformedJobError

MAX_MANIFEST_LINE = 64 * 1024  # characters; a JSONL row of 64 image refs of 1 KiB fits
MAX_LINE_BYTES = 4 * MAX_MANIFEST_LINE  # a partial line longer than this has more than MAX_MANIFEST_LINE characters
TOO_LONG = "<line too long>\n"  # sentinels ``split_lines`` yields instead of a line (compared by identity)
NOT_UTF8 = "<not UTF-8>\n"

State = tuple[int, int] | None


class ManifestRowError(ValueError):
    """One bad manifest row (or group of rows): its 1-based line, the subject when it could be read, a message."""

    def __init__(self, line: int, message: str, subject: str | None = None, code: str = "malformed_job") -> None:
        super().__init__(f"manifest line {line}: {message}")
        self.line = line
        self.reason = message
        self.subject = subject
        self.code = code


class ManifestRow(BaseModel):
    """One subject to enrol. ``line`` is where the row started (1-based; for prefixes the object index)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: int
    subject: SubjectId
    images: list[S3Ref] = Field(min_length=1, max_length=MAX_IMAGES_PER_JOB)
    key_id: KeyId | None = None


Item = ManifestRow | ManifestRowError


# --- lines ------------------------------------------------------------------------------------------------------
def split_lines(chunks: Iterable[bytes], start: int = 0) -> Iterator[tuple[str, int]]:
    """Byte chunks of a manifest that start at byte ``start`` of it -> (text line, byte offset just after it), in
    constant memory. A line longer than ``MAX_MANIFEST_LINE`` characters comes out as ``TOO_LONG`` and one that is
    not UTF-8 as ``NOT_UTF8`` (nothing of either is kept), so its row fails alone and the rest go on. Lines are split
    on the bytes (a ``\\n`` byte never occurs inside a multi-byte UTF-8 character), so every end offset is exact."""
    buf = b""
    pos = start  # offset of buf[0]
    skipping = False  # inside a line already known to be too long: drop it until its end
    for chunk in chunks:
        buf += chunk
        parts = buf.split(b"\n")
        buf = parts.pop()
        for raw in parts:
            pos += len(raw) + 1
            if skipping:
                skipping = False
                yield TOO_LONG, pos
            else:
                yield _text(raw, "\n"), pos
        if len(buf) > MAX_LINE_BYTES:
            skipping, pos, buf = True, pos + len(buf), b""
    if skipping:
        yield TOO_LONG, pos + len(buf)
    elif buf:
        yield _text(buf, ""), pos + len(buf)


def _text(raw: bytes, end: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8
    return TOO_LONG if len(text) > MAX_MANIFEST_LINE else text + end


def _line_defect(line: str) -> str | None:
    if line is TOO_LONG:
        return f"line longer than {MAX_MANIFEST_LINE} characters"
    if line is NOT_UTF8:
        return "line is not UTF-8"
    return None


# --- grouping ---------------------------------------------------------------------------------------------------
class _Group:
    def __init__(self, line: int, subject: str, key_id: str | None) -> None:
        self.line = line
        self.last = line
        self.subject = subject
        self.key_id = key_id
        self.images: dict[str, int] = {}  # ref -> its line (at most MAX_IMAGES_PER_JOB kept)
        self.refs: list[S3Ref] = []
        self.count = 0

    def result(self) -> Item:
        if self.count > MAX_IMAGES_PER_JOB:
            return ManifestRowError(
                self.line,
                f"subject {self.subject} has {self.count} images (lines {self.line}-{self.last}); at most "
                f"{MAX_IMAGES_PER_JOB} per enrolment: not enrolled",
                self.subject,
            )
        # every field was checked row by row (``Grouper.add``): built without validating it all again
        return ManifestRow.model_construct(line=self.line, subject=self.subject, images=self.refs, key_id=self.key_id)


class Grouper:
    """Consecutive rows of one subject -> one ``ManifestRow``. ``add`` returns what it completes: the previous
    subject's enrolment (when ``subject`` differs) and/or this row's own error. Bad rows never start, end or join a
    group. ``pending`` tells whether an enrolment is still being collected."""

    def __init__(self) -> None:
        self.group: _Group | None = None

    @property
    def pending(self) -> bool:
        return self.group is not None

    def add(self, line: int, subject: str, image: str, key_id: str | None) -> list[Item]:
        out: list[Item] = []
        try:
            check_name(subject, "subject")
        except ValueError as e:
            return [ManifestRowError(line, str(e))]
        try:
            bucket, key = parse_s3_uri(image)
        except ValueError as e:
            return [ManifestRowError(line, f"image: {e}", subject)]
        if key_id is not None:
            try:
                check_key_id(key_id)
            except ValueError as e:
                return [ManifestRowError(line, str(e), subject)]
        g = self.group
        if g is None or g.subject != subject:
            if g is not None:
                out.append(g.result())
            g = self.group = _Group(line, subject, key_id)
        elif key_id != g.key_id:
            return [
                ManifestRowError(
                    line, f"key_id {key_id or '(none)'} differs from {g.key_id or '(none)'} at line {g.line}", subject
                )
            ]
        elif image in g.images:
            return [ManifestRowError(line, f"image already listed for this subject at line {g.images[image]}", subject)]
        g.count += 1
        g.last = line
        if len(g.images) < MAX_IMAGES_PER_JOB:
            g.images[image] = line
            g.refs.append(S3Ref.model_construct(bucket=bucket, key=key))
        return out

    def finish(self) -> list[Item]:
        g, self.group = self.group, None
        return [] if g is None else [g.result()]


# --- CSV --------------------------------------------------------------------------------------------------------
CSV_COLUMNS = (["subject", "image"], ["subject", "image", "key_id"])


def csv_header(line: str) -> int:
    """The header line -> its number of columns; ``MalformedJobError`` (the whole manifest is refused) otherwise."""
    if _line_defect(line) is not None:
        raise MalformedJobError(f"manifest line 1: {_line_defect(line)}")
    try:
        cols = [h.strip().lower() for h in next(csv.reader([line.lstrip("\ufeff")], strict=True), [])]
    except csv.Error:
        cols = []
    if cols not in CSV_COLUMNS:
        raise MalformedJobError("manifest line 1: CSV header must be subject,image[,key_id]")
    return len(cols)


def csv_record(line: str) -> list[str] | None:
    """One physical line -> its fields (None for a blank line); ``ValueError`` with the reason otherwise."""
    defect = _line_defect(line)
    if defect is not None:
        raise ValueError(defect)
    if not line.strip():
        return None
    try:
        rec = next(csv.reader([line], strict=True), [])
    except csv.Error as e:
        msg = "a quoted field is not closed on its line" if "end of data" in str(e) else f"not valid CSV ({e})"
        raise ValueError(msg) from None
    if all(not c.strip() for c in rec):
        return None
    return rec


def csv_items(
    lines: Iterable[tuple[str, int]],
    start: int = 0,
    line0: int = 0,
    header: str | None = None,
    info: dict[str, int] | None = None,
) -> Iterator[tuple[Item, State]]:
    """CSV lines (from ``split_lines``) -> (item, resume state). From the object's start (``header`` None) the first
    line is the header and the byte length of that line goes to ``info["header_bytes"]``; a continuation passes the
    header line and the stream from byte ``start``, ``line0`` physical lines in, so line numbers are those of a read
    from the start."""
    it = iter(lines)
    if header is None:
        first = next(it, None)
        if first is None:
            return
        header, start, line0 = first[0], first[1], 1
        if info is not None:
            info["header_bytes"] = start
    ncols = csv_header(header)
    grouper = Grouper()
    before: tuple[int, int] = (start, line0)  # where the line being read begins
    n = line0
    for line, end in it:
        n += 1
        try:
            rec = csv_record(line)
            if rec is not None and len(rec) != ncols:
                raise ValueError(f"expected {ncols} columns, got {len(rec)}")
        except ValueError as e:
            rec = None
            yield ManifestRowError(n, str(e), _readable_subject(line)), (None if grouper.pending else (end, n))
        if rec is not None:
            subject, image = rec[0].strip(), rec[1].strip()
            key_id = (rec[2].strip() or None) if ncols > 2 else None
            for item in grouper.add(n, subject, image, key_id):
                if isinstance(item, ManifestRowError) and item.line == n:  # this row's own error
                    yield item, (None if grouper.pending else (end, n))
                else:  # the previous subject, complete: a reader starting at this line produces what follows
                    yield item, before
        before = (end, n)
    for item in grouper.finish():
        yield item, before


def _readable_subject(line: str) -> str | None:
    """The first field of a bad CSV line when it is a valid subject ID (for the report), else None."""
    if line is TOO_LONG or line is NOT_UTF8 or "," not in line:
        return None
    head = line.split(",", 1)[0].strip().strip('"')
    try:
        return check_name(head, "subject")
    except ValueError:
        return None


# --- JSONL ------------------------------------------------------------------------------------------------------
def jsonl_record(n: int, line: str) -> ManifestRow | None:
    """One JSONL line -> its enrolment (None for a blank line); ``ManifestRowError`` at line ``n`` otherwise."""
    defect = _line_defect(line)
    if defect is not None:
        raise ManifestRowError(n, defect)
    s = line.strip()
    if not s:
        return None
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise ManifestRowError(n, f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or set(obj) - {"subject", "images", "key_id"}:
        raise ManifestRowError(n, "expected an object with subject, images[, key_id] only")
    subject = obj.get("subject")
    readable = subject if isinstance(subject, str) and _valid_name(subject) else None
    images = obj.get("images")
    if not isinstance(images, list):
        raise ManifestRowError(n, "images must be a list of s3:// refs", readable)
    if len({json.dumps(i) for i in images}) != len(images):
        raise ManifestRowError(n, "images lists the same ref twice", readable)
    try:
        return ManifestRow(line=n, subject=subject, images=images, key_id=obj.get("key_id"))  # type: ignore[arg-type]
    except ValidationError as e:
        raise ManifestRowError(n, _pydantic_message(e), readable) from None


def jsonl_items(lines: Iterable[tuple[str, int]], line0: int = 0) -> Iterator[tuple[Item, State]]:
    """JSONL lines (from ``split_lines``) -> (item, resume state): one line, one enrolment or one error."""
    for n, (line, end) in enumerate(lines, start=line0 + 1):
        try:
            row = jsonl_record(n, line)
        except ManifestRowError as e:
            yield e, (end, n)
            continue
        if row is not None:
            yield row, (end, n)


# --- prefix -----------------------------------------------------------------------------------------------------
HEARTBEAT_KEYS = 1000  # prefix listings: a place to stop at least this often, even when no key matches


def prefix_items(
    bucket: str, prefix: str, keys: Iterable[str], rule: Any, line0: int = 0
) -> Iterator[tuple[Item | None, tuple[int, str] | None]]:
    """Listed object keys (in listing order, i.e. sorted) -> enrolments grouped by the ``subject`` group of ``rule``
    (RE2, ``worker.contracts.naming``) matched against the key relative to ``prefix``; keys that do not match are
    skipped. The "line" of an item is the object's 1-based index in the listing (``keys`` starts after ``line0``).

    Each item comes with a resume state (index, key): a listing that starts after ``key``, numbering from
    ``index``, produces exactly the items that follow (None where no such point exists). Every ``HEARTBEAT_KEYS``
    keys a ``(None, state)`` is yielded as well, so that a caller can stop a long listing that matches little: the
    state is this key, or, while an enrolment is being collected, the key before its first one (None when that
    enrolment began with this listing, so a listing resumed there always gets past it)."""
    grouper = Grouper()
    prev: tuple[int, str] | None = None
    group_start: tuple[int, str] | None = None  # where to resume to collect the pending enrolment again
    for n, key in enumerate(keys, start=line0 + 1):
        rel = key[len(prefix) :] if key.startswith(prefix) else key
        m = rule.match(rel)
        if m:
            was = grouper.group
            for item in grouper.add(n, m.group("subject") or "", f"s3://{bucket}/{key}", None):
                if isinstance(item, ManifestRowError) and item.line == n:  # this key's own error
                    if grouper.pending:
                        group_start = None  # an item yielded inside the enrolment: no way back to its start
                    yield item, (None if grouper.pending else (n, key))
                else:  # the previous subject, complete: a listing after the previous key produces what follows
                    yield item, prev
            if grouper.group is not None and grouper.group is not was:
                group_start = prev  # a new enrolment began at this key
        if n % HEARTBEAT_KEYS == 0:
            state = group_start if grouper.pending else (n, key)
            if state is not None:
                yield None, state
        prev = (n, key)
    for item in grouper.finish():
        yield item, prev


# --- whole-manifest helpers -----------------------------------------------------------------------------------------
def first_lines() -> Callable[[Item], Item]:
    """A checker of non-consecutive subjects for one pass held in memory (the CLI): ``check(item)`` returns the
    item, or a ``ManifestRowError`` when its subject already had an enrolment earlier in the manifest."""
    seen: dict[str, int] = {}

    def check(item: Item) -> Item:
        if isinstance(item, ManifestRowError):
            return item
        first = seen.setdefault(item.subject, item.line)
        return item if first == item.line else not_consecutive(item.line, item.subject, first)

    return check


def not_consecutive(line: int, subject: str, first: int) -> ManifestRowError:
    """The error of an enrolment at ``line`` whose subject already had one starting at line ``first``."""
    return ManifestRowError(
        line,
        f"subject {subject} is listed again after other subjects (first at line {first}); rows of one subject "
        "must be consecutive: these rows were not enrolled",
        subject,
    )


def iter_csv(lines: Iterable[str]) -> Iterator[ManifestRow]:
    """Text lines of a whole CSV manifest -> its enrolments; raises the first ``ManifestRowError``."""
    for item, _ in csv_items((line, 0) for line in lines):
        if isinstance(item, ManifestRowError):
            raise item
        yield item


def iter_jsonl(lines: Iterable[str]) -> Iterator[ManifestRow]:
    """Text lines of a whole JSONL manifest -> its enrolments; raises the first ``ManifestRowError``."""
    for item, _ in jsonl_items((line, 0) for line in lines):
        if isinstance(item, ManifestRowError):
            raise item
        yield item


def iter_prefix(bucket: str, prefix: str, keys: Iterable[str], rule: Any) -> Iterator[ManifestRow]:
    """``prefix_items`` raising the first ``ManifestRowError``."""
    for item, _ in prefix_items(bucket, prefix, keys, rule):
        if isinstance(item, ManifestRowError):
            raise item
        if item is not None:
            yield item


def _valid_name(v: str) -> bool:
    try:
        check_name(v)
        return True
    except ValueError:
        return False


def _pydantic_message(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors(include_input=False))
