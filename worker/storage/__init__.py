"""S3 storage: client factory, the documented layout (docs/storage-layout.md), atomic template versions, dead
letters, model-bundle sync. boto3 is imported lazily (inside ``make_s3_client``)."""

from worker.storage import layout
from worker.storage.bundles import sync_bundle
from worker.storage.client import ObjectInfo, ObjectStore, make_s3_client, sse_params
from worker.storage.deadletters import iter_dead_letters, read_dead_letter, write_dead_letter
from worker.storage.records import (
    Artefact,
    CurrentPointer,
    DeadLetter,
    KeyStateRecord,
    RevocationRecord,
    SourceImage,
    SubjectKeyRecord,
    TemplateRecord,
    VersionManifest,
    decode_embedding,
    encode_embedding,
)
from worker.storage.templates import CommittedVersion, TemplateStore

__all__ = [
    "Artefact",
    "CommittedVersion",
    "CurrentPointer",
    "DeadLetter",
    "KeyStateRecord",
    "ObjectInfo",
    "ObjectStore",
    "RevocationRecord",
    "SourceImage",
    "SubjectKeyRecord",
    "TemplateRecord",
    "TemplateStore",
    "VersionManifest",
    "decode_embedding",
    "encode_embedding",
    "iter_dead_letters",
    "layout",
    "make_s3_client",
    "read_dead_letter",
    "sse_params",
    "sync_bundle",
    "write_dead_letter",
]
