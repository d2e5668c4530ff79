"""``s3://bucket/key`` references, validated before anything is queued."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")


def _check_bucket(b: str) -> str:
    if not _BUCKET.fullmatch(b) or ".." in b or _IP.fullmatch(b) or ".-" in b or "-." in b:
        raise ValueError("invalid S3 bucket name (3-63 chars of [a-z0-9.-], alphanumeric at both ends)")
    return b


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 control characters


def _check_key(k: str, *, prefix: bool = False) -> str:
    if not k and not prefix:
        raise ValueError("S3 ref has an empty key")
    if len(k.encode("utf-8")) > 1024:
        raise ValueError("S3 key longer than 1024 bytes")
    if k.startswith("/"):
        raise ValueError("S3 key must not start with '/'")
    if _CONTROL.search(k):
        raise ValueError("S3 key contains control characters")
    if "\\" in k:
        raise ValueError("S3 key must not contain a backslash (some S3 servers read it as '/')")
    if "/./" in f"/{k}/" or "/../" in f"/{k}/":  # a "." or ".." segment
        raise ValueError("S3 key must not contain '.' or '..' segments")
    return k


def parse_s3_uri(uri: str, *, prefix: bool = False) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; ``prefix=True`` allows an empty key or a trailing ``/``."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError("expected an s3://bucket/key reference")
    rest = uri[5:]
    bucket, sep, key = rest.partition("/")
    if not sep and not prefix:
        raise ValueError("S3 ref has no key (expected s3://bucket/key)")
    return _check_bucket(bucket), _check_key(key, prefix=prefix)


class S3Ref(BaseModel):
    """One S3 object. On the wire it is the string ``s3://bucket/key``; in Python ``ref.bucket``, ``ref.key``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str
    key: str

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, v: Any) -> Any:
        if isinstance(v, str):
            bucket, key = parse_s3_uri(v)
            return {"bucket": bucket, "key": key}
        if isinstance(v, dict):
            _check_bucket(str(v.get("bucket", ""))), _check_key(str(v.get("key", "")))
        return v

    @model_serializer(mode="plain")
    def _to_str(self) -> str:
        return self.uri

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str) -> S3Ref:
        return cls.model_validate(uri)

    def __str__(self) -> str:
        return self.uri


class S3Prefix(BaseModel):
    """A bucket prefix ``s3://bucket/some/prefix/`` (the key part may be empty). Wire form: the string."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str
    prefix: str

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, v: Any) -> Any:
        if isinstance(v, str):
            bucket, key = parse_s3_uri(v, prefix=True)
            return {"bucket": bucket, "prefix": key}
        return v

    @model_serializer(mode="plain")
    def _to_str(self) -> str:
        return self.uri

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def __str__(self) -> str:
        return self.uri
