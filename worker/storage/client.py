"""S3 access: a client factory from settings and ``ObjectStore``, a thin wrapper that

- sends the configured server-side encryption on every PutObject / CopyObject / multipart upload,
- maps botocore errors onto ``worker.errors`` (404 -> ObjectNotFoundError, 412 / 409 -> VersionConflictError, any
  other 4xx but throttling and timeouts -> InvalidInputError, permanent; 5xx, throttling, timeouts and connection
  errors -> StorageError, retryable),
- supports conditional writes (``if_none_match=True`` -> ``If-None-Match: *``, ``if_match=etag``).

Error messages carry bucket and key only, never object bodies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.errors import InvalidInputError, ObjectNotFoundError, StorageError, VersionConflictError

if TYPE_CHECKING:
    from worker.settings import S3Settings


def make_s3_client(s3: S3Settings) -> Any:
    """A boto3 S3 client for ``s3`` settings (standard retry mode, path-style by default, explicit timeouts)."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        region_name=s3.region,
        retries={"mode": "standard", "max_attempts": s3.max_attempts},
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        max_pool_connections=s3.max_pool_connections,
        s3={"addressing_style": s3.addressing_style},
        signature_version="s3v4",
        # integrity checksums on every request are not supported the same way by every S3 implementation
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    kw: dict[str, Any] = {"config": cfg}
    if s3.endpoint_url:
        kw["endpoint_url"] = s3.endpoint_url
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        kw["aws_access_key_id"] = s3.access_key_id.get_secret_value()
        kw["aws_secret_access_key"] = s3.secret_access_key.get_secret_value()
    session = boto3.session.Session()
    # listings parse one LastModified per key; botocore's dateutil parser costs ~0.4 ms each (most of a LIST page)
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    return session.client("s3", **kw)


def parse_timestamp(value: Any) -> datetime:
    """An S3 timestamp: ISO 8601 (listings) by ``datetime.fromisoformat``, anything else (HTTP dates in headers,
    epoch numbers, ISO without a zone) by botocore's own parser, so the result is always botocore's."""
    if isinstance(value, str) and len(value) >= 20 and value[10:11] == "T":
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if dt.tzinfo is not None:
                return dt
    from botocore.utils import parse_timestamp as botocore_parse

    return botocore_parse(value)  # type: ignore[no-any-return]


def sse_params(s3: S3Settings) -> dict[str, str]:
    """Extra PutObject parameters for the configured server-side encryption (empty for ``none``)."""
    if s3.sse == "none":
        return {}
    out: dict[str, str] = {"ServerSideEncryption": str(s3.sse)}
    if s3.sse == "aws:kms" and s3.sse_kms_key_id:
        out["SSEKMSKeyId"] = s3.sse_kms_key_id
    return out


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str
    size: int
    last_modified: datetime | None = None


# 4xx answers that say "not now" rather than "never": retried like a 5xx
TRANSIENT_4XX_STATUS = frozenset({408, 429})
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeTooSkewed",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InternalError",
        "ServiceUnavailable",
    }
)


def is_permanent(code: str, status: int) -> bool:
    """Whether an S3 error answer (``code``, HTTP ``status``) will be the same however often it is retried: every
    4xx except throttling, timeouts, clock skew and expired credentials. 5xx and no answer at all are transient."""
    return 400 <= status < 500 and status not in TRANSIENT_4XX_STATUS and code not in TRANSIENT_CODES


def _code(e: Exception) -> tuple[str, int]:
    resp = getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class ObjectStore:
    """One bucket (``bucket``) plus read access to any bucket by ref. Keys passed in are relative to ``prefix``."""

    def __init__(self, client: Any, bucket: str, *, prefix: str = "", sse: dict[str, str] | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.sse = dict(sse or {})

    @classmethod
    def from_settings(cls, s3: S3Settings, client: Any = None) -> ObjectStore:
        return cls(client or make_s3_client(s3), s3.bucket, prefix=s3.prefix, sse=sse_params(s3))

    # --- naming ---------------------------------------------------------------------------------------------------
    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    # --- errors ---------------------------------------------------------------------------------------------------
    def _raise(self, e: Exception, op: str, bucket: str, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"{op} s3://{bucket}/{key}"
        if isinstance(e, ClientError):
            code, status = _code(e)
            if status == 404 or code in ("NoSuchKey", "NotFound", "404", "NoSuchBucket"):
                raise ObjectNotFoundError(f"{where}: not found ({code or status})") from None
            if status == 412 or code == "PreconditionFailed":
                raise VersionConflictError(f"{where}: precondition failed") from None
            if code in ("ConditionalRequestConflict",) or status == 409:
                raise VersionConflictError(f"{where}: conditional request conflict") from None
            if is_permanent(code, status):
                raise InvalidInputError(f"{where}: refused by S3, {code or 'error'} (HTTP {status})") from None
            raise StorageError(f"{where}: {code or 'error'} (HTTP {status})") from None
        if isinstance(e, BotoCoreError):
            raise StorageError(f"{where}: {type(e).__name__}") from None
        raise e

    # --- writes ---------------------------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """PutObject with SSE; returns the new ETag. Conditional failures raise ``VersionConflictError``."""
        kw: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.full_key(key),
            "Body": body,
            "ContentType": content_type,
            **self.sse,
        }
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            kw["IfMatch"] = if_match
        if metadata:
            kw["Metadata"] = metadata
        try:
            return str(self.client.put_object(**kw)["ETag"])
        except Exception as e:  # mapped
            self._raise(e, "put", self.bucket, kw["Key"])
            raise  # unreachable

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))
        except Exception as e:
            self._raise(e, "delete", self.bucket, self.full_key(key))

    def delete_many(self, bucket: str, keys: Sequence[str]) -> None:
        """Delete absolute ``keys`` of ``bucket``, 1,000 per request (S3's limit); missing keys are not an error."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                r = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as e:
                self._raise(e, "delete", bucket, batch[0]["Key"])
            errors = r.get("Errors") or []
            if errors:
                raise StorageError(f"delete in s3://{bucket}: {len(errors)} of {len(batch)} objects not deleted")

    # --- reads ----------------------------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        """(body, etag) of ``key`` in this store's bucket."""
        return self.get_object(self.bucket, self.full_key(key))

    def get_object(self, bucket: str, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """(body, etag) of any object (absolute key). ``max_bytes``: refuse larger objects before reading them
        (raises ``worker.errors.ImageTooLargeError``)."""
        try:
            r = self.client.get_object(Bucket=bucket, Key=key)
        except Exception as e:
            self._raise(e, "get", bucket, key)
            raise
        size = int(r.get("ContentLength") or 0)
        if max_bytes is not None and size > max_bytes:
            r["Body"].close()
            from worker.errors import ImageTooLargeError

            raise ImageTooLargeError(f"s3://{bucket}/{key}: {size} bytes over the limit of {max_bytes}")
        try:
            body = r["Body"].read() if max_bytes is None else r["Body"].read(max_bytes + 1)
        except Exception as e:
            self._raise(e, "read", bucket, key)
            raise
        if max_bytes is not None and len(body) > max_bytes:
            from worker.errors import ImageTooLargeError

            raise ImageTooLargeError(f"s3://{bucket}/{key}: over the limit of {max_bytes} bytes")
        return body, str(r.get("ETag", ""))

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of ``key``, or ``None`` when it does not exist."""
        fk = self.full_key(key)
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=fk)
        except Exception as e:
            try:
                self._raise(e, "head", self.bucket, fk)
            except ObjectNotFoundError:
                return None
            raise
        return ObjectInfo(key=key, etag=str(r["ETag"]), size=int(r["ContentLength"]))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(
        self, prefix: str, *, bucket: str | None = None, absolute: bool = False, start_after: str | None = None
    ) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order, paginated (constant memory). Keys yielded relative to this store's
        prefix unless ``absolute`` (or another ``bucket``) is given. ``start_after``: only keys after this one (given
        like ``prefix``)."""
        b = bucket or self.bucket
        full = prefix if (absolute or bucket) else self.full_key(prefix)
        strip = "" if (absolute or bucket or not self.prefix) else self.prefix + "/"
        kw: dict[str, str] = {"Bucket": b, "Prefix": full}
        if start_after:
            kw["StartAfter"] = start_after if (absolute or bucket) else self.full_key(start_after)
        pages = self.client.get_paginator("list_objects_v2").paginate(**kw)
        try:
            for page in pages:
                for o in page.get("Contents", []) or []:
                    k = o["Key"]
                    yield ObjectInfo(
                        key=k[len(strip) :] if strip else k,
                        etag=str(o.get("ETag", "")),
                        size=o["Size"],
                        last_modified=o.get("LastModified"),
                    )
        except Exception as e:
            self._raise(e, "list", b, full)

    def list_dirs(self, prefix: str, *, start_after: str | None = None) -> Iterator[str]:
        """Immediate 'sub-directory' names under ``prefix`` (which should end with '/'), in key order; with
        ``start_after``, only names after that one (a listing resumed where it stopped)."""
        full = self.full_key(prefix)
        kw: dict[str, str] = {"Bucket": self.bucket, "Prefix": full, "Delimiter": "/"}
        if start_after:
            kw["StartAfter"] = full + start_after + "/\uffff"  # past every key of that sub-directory
        pages = self.client.get_paginator("list_objects_v2").paginate(**kw)
        try:
            for page in pages:
                for cp in page.get("CommonPrefixes", []) or []:
                    yield cp["Prefix"][len(full) :].rstrip("/")
        except Exception as e:
            self._raise(e, "list", self.bucket, full)

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (dev stack and tests; production buckets are provisioned)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except Exception:
            pass
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except Exception as e:
            code, _ = _code(e)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                self._raise(e, "create_bucket", self.bucket, "")

    # --- JSON helpers ---------------------------------------------------------------------------------------------
    def put_json(self, key: str, obj: Any, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write a pydantic model or JSON-able value as ``application/json``; returns the ETag."""
        import json

        data = obj.model_dump_json().encode() if hasattr(obj, "model_dump_json") else json.dumps(obj).encode()
        return self.put(key, data, content_type="application/json", if_none_match=if_none_match, if_match=if_match)

    def get_json(self, key: str) -> tuple[Any, str]:
        """(decoded JSON, etag). Raises ``ObjectNotFoundError``; a body that is not JSON raises ``StorageError``."""
        import json

        body, etag = self.get(key)
        try:
            return json.loads(body), etag
        except ValueError:
            raise StorageError(f"s3://{self.bucket}/{self.full_key(key)}: not JSON") from None
