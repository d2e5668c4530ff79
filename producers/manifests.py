"""Local bulk manifests, checked by the producer before anything is uploaded or queued.

The file is read with the workers' own row-by-row parser (``worker.contracts.manifest``), in bounded chunks, so an
over-long field, an unterminated quote or a stray byte is an error at its line, never a traceback, and the rows after
it are still checked. Subjects listed again after other subjects are found too (their first lines are kept in
memory: one entry per subject).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.contracts.manifest import ManifestRowError, csv_items, first_lines, jsonl_items, split_lines
from worker.errors import MalformedJobError

SHOWN_ERRORS = 20


@dataclass
class ManifestCheck:
    """What a pass over a local manifest found: enrolments, and the bad rows (the first ``SHOWN_ERRORS`` kept)."""

    enrolments: int = 0
    bad_rows: int = 0
    errors: list[ManifestRowError] = field(default_factory=list)

    def message(self, path: Path) -> str:
        lines = [f"{path}: {self.bad_rows} bad row(s), nothing queued (fix them, or see `cancelable bulk --help`):"]
        lines += [f"  line {e.line}: {e.reason}" for e in self.errors]
        if self.bad_rows > len(self.errors):
            lines.append(f"  ... and {self.bad_rows - len(self.errors)} more")
        return "\n".join(lines)


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(256 * 1024):
            yield chunk


def check_manifest(path: Path, fmt: str) -> ManifestCheck:
    """Parse the whole file; ``MalformedJobError`` when it cannot be a manifest at all (missing, a bad CSV header)."""
    if fmt not in ("csv", "jsonl"):
        raise MalformedJobError("a local manifest must be csv or jsonl")
    if not path.is_file():
        raise MalformedJobError(f"manifest file not found: {path}")
    lines = split_lines(_chunks(path))
    items = (item for item, _ in (csv_items(lines) if fmt == "csv" else jsonl_items(lines)))
    seen = first_lines()
    out = ManifestCheck()
    try:
        for item in items:
            item = seen(item)
            if isinstance(item, ManifestRowError):
                out.bad_rows += 1
                if len(out.errors) < SHOWN_ERRORS:
                    out.errors.append(item)
            else:
                out.enrolments += 1
    except MalformedJobError as e:
        raise MalformedJobError(f"{path}: {e}") from None
    out.errors.sort(key=lambda e: e.line)
    return out
