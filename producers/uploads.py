"""Local photos -> the tenant's input prefix in the input bucket (``s3.input_bucket``, default ``<bucket>-inputs``;
the prefix every tenant may read by default, ``worker.contracts.inputs``).

A file is checked before anything is sent (exists, is a JPEG, PNG or WebP by its first bytes, not larger than the
worker accepts) and named by its content: ``s3://{input_bucket}/tenants/{tenant}/uploads/{sha256[:32]}.{ext}``, so
its final reference is known before the upload (the job is validated first) and uploading the same photo twice
stores one object. Never imports torch or PIL.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from worker.errors import MalformedJobError

# (magic prefix, extension, content type); WebP is RIFF....WEBP
_FORMATS = [
    (b"\xff\xd8\xff", "jpg", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png", "image/png"),
]


@dataclass(frozen=True)
class LocalImage:
    """A checked local photo and the reference it gets once uploaded."""

    path: Path
    uri: str
    key: str
    body: bytes
    content_type: str


def is_local(ref: str) -> bool:
    """Anything that is not an ``s3://`` reference is taken as a local file path."""
    return not ref.startswith("s3://")


def _sniff(head: bytes) -> tuple[str, str] | None:
    for magic, ext, ctype in _FORMATS:
        if head.startswith(magic):
            return ext, ctype
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


def check_local_image(path: str | Path, tenant: str, input_bucket: str, max_bytes: int) -> LocalImage:
    """Read and check one local photo; ``MalformedJobError`` (one line, no file content) when it cannot be used."""
    p = Path(path)
    if not p.is_file():
        raise MalformedJobError(f"{p}: no such file (give a local photo or an s3://bucket/key reference)")
    size = p.stat().st_size
    if size > max_bytes:
        raise MalformedJobError(f"{p}: {size} bytes, larger than the {max_bytes} bytes a worker accepts")
    body = p.read_bytes()
    kind = _sniff(body[:16])
    if kind is None:
        raise MalformedJobError(f"{p}: not a JPEG, PNG or WebP image")
    ext, ctype = kind
    from worker.storage import layout  # lazy: keeps `cancelable --help` fast

    key = layout.upload_key(tenant, hashlib.sha256(body).hexdigest(), ext)
    return LocalImage(p, f"s3://{input_bucket}/{key}", key, body, ctype)
