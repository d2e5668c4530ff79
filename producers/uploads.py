"""Local photos -> the tenant's input prefix in the input bucket (``s3.input_bucket``, default ``<bucket>-inputs``;
the prefix every tenant may read by default, ``worker.contracts.inputs``).

A file is checked before anything is sent (a file, not empty, a JPEG, PNG or WebP by its first bytes, not more bytes
nor, by its header, more pixels than the workers accept) and named by its content:
``s3://{input_bucket}/tenants/{tenant}/uploads/{sha256[:32]}.{ext}``, so
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


def check_local_image(
    path: str | Path,
    tenant: str,
    input_bucket: str,
    max_bytes: int,
    max_pixels: int | None = None,
    max_pixels_full_decode: int | None = None,
) -> LocalImage:
    """Read and check one local photo; ``MalformedJobError`` (one line, no file content) when it cannot be used.
    ``max_pixels`` limits JPEGs, ``max_pixels_full_decode`` PNG and WebP (the workers' ``worker.*`` settings)."""
    p = Path(path)
    if p.is_dir():
        raise MalformedJobError(f"{p}: is a directory, not a photo (give the photo files in it)")
    if not p.exists():
        raise MalformedJobError(f"{p}: no such file (give a local photo or an s3://bucket/key reference)")
    if not p.is_file():
        raise MalformedJobError(f"{p}: not a regular file (give a local photo or an s3://bucket/key reference)")
    size = p.stat().st_size
    if size == 0:
        raise MalformedJobError(f"{p}: empty file (0 bytes)")
    if size > max_bytes:
        raise MalformedJobError(f"{p}: {size} bytes, larger than the {max_bytes} bytes a worker accepts")
    body = p.read_bytes()
    kind = _sniff(body[:16])
    if kind is None:
        raise MalformedJobError(f"{p}: not a JPEG, PNG or WebP image")
    ext, ctype = kind
    limit = max_pixels if ext == "jpg" else (max_pixels_full_decode or max_pixels)
    if limit is not None:
        from producers.imagesize import image_size

        dims = image_size(body[: 1 << 20], ext)
        if dims is not None and dims[0] * dims[1] > limit:
            raise MalformedJobError(
                f"{p}: {dims[0]}x{dims[1]} = {dims[0] * dims[1] / 1e6:.1f} megapixels, more than the "
                f"{limit / 1e6:.0f} a worker accepts{'' if ext == 'jpg' else ' for ' + ext.upper()} "
                "(CANCELABLE_WORKER__MAX_PIXELS" + ("" if ext == "jpg" else "_FULL_DECODE") + ")"
            )
    from worker.storage import layout  # lazy: keeps `cancelable --help` fast

    key = layout.upload_key(tenant, hashlib.sha256(body).hexdigest(), ext)
    return LocalImage(p, f"s3://{input_bucket}/{key}", key, body, ctype)
