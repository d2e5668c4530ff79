"""``cancelable fetch``: a committed template version as files in a local directory.

Reads pointer -> manifest -> artefacts (each checked against the manifest's SHA-256) and writes:

- ``image-NN.<ext>``: the cancelable images, in enrolment (source image) order;
- ``template.json``: the template record (key ID and version, bundle, the template embedding, no key material);
- ``manifest.json``: the version manifest (what the version lists, with S3 URIs and hashes).

Each file is written to a temporary name and renamed, so a directory never holds a half-written file. Existing files
are not overwritten unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from worker.errors import MalformedJobError, NoTemplateError, ObjectNotFoundError

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


def _write(path: Path, body: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def fetch(
    client: Any, tenant: str, subject: str, version: int | None, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``version`` (default: current) of ``tenant``/``subject`` into ``out_dir``; returns what was written.

    Raises ``NoTemplateError`` (nothing committed, or no such version) and ``MalformedJobError`` (bad IDs, files in
    the way)."""
    from worker.contracts import check_name
    from worker.storage.templates import TemplateStore

    try:
        check_name(tenant, "tenant"), check_name(subject, "subject")
    except ValueError as e:
        raise MalformedJobError(f"malformed request: {e}") from None
    ts = TemplateStore(client.store)
    if version is None:
        manifest = ts.current(tenant, subject).manifest
    else:
        try:
            manifest = ts.get_manifest(tenant, subject, version)
        except ObjectNotFoundError:
            raise NoTemplateError(f"no version {version} of {tenant}/{subject}") from None
    files: list[tuple[str, bytes]] = []
    for i, art in enumerate(manifest.images):
        try:
            body = ts.load_image(art)
        except ObjectNotFoundError:
            raise NoTemplateError(
                f"the cancelable images of version {manifest.version} of {tenant}/{subject} were purged at revocation"
            ) from None
        files.append((f"image-{i:02d}.{_EXT.get(art.content_type, 'bin')}", body))
    template = ts.load_template(manifest)
    files.append(("template.json", json.dumps(template.model_dump(mode="json"), indent=1, sort_keys=True).encode()))
    files.append(("manifest.json", json.dumps(manifest.model_dump(mode="json"), indent=1, sort_keys=True).encode()))

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MalformedJobError(f"{out}: exists and is not a directory")
    in_the_way = [n for n, _ in files if (out / n).exists()]
    if in_the_way and not overwrite:
        raise MalformedJobError(f"{out}: already holds {', '.join(in_the_way[:3])} (give --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    for name, body in files:
        _write(out / name, body)
    return {
        "tenant": tenant,
        "subject": subject,
        "version": manifest.version,
        "key_id": manifest.key_id,
        "key_version": manifest.key_version,
        "dir": str(out),
        "files": [n for n, _ in files],
    }
