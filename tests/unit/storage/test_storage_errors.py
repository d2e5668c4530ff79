"""How S3 error answers map onto ``worker.errors``: a 4xx that will never change fails the job at once, throttling,
timeouts and 5xx are retried (``ObjectStore._raise``)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from worker.errors import InvalidInputError, ObjectNotFoundError, StorageError, VersionConflictError
from worker.storage.client import ObjectStore


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get")


def _mapped(e: Exception) -> StorageError:
    with pytest.raises(StorageError) as info:
        ObjectStore(None, "b")._raise(e, "get", "inb", "tenants/acme/a.jpg")
    return info.value


@pytest.mark.parametrize(
    ("code", "status"),
    [("InvalidRequest", 400), ("InvalidArgument", 400), ("AccessDenied", 403), ("KeyTooLongError", 400), ("", 400)],
)
def test_a_4xx_that_will_not_change_is_permanent(code: str, status: int) -> None:
    err = _mapped(_client_error(code, status))
    assert type(err) is InvalidInputError and err.code == "invalid_input" and not err.retryable
    assert "s3://inb/tenants/acme/a.jpg" in str(err) and f"HTTP {status}" in str(err)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SlowDown", 503),
        ("InternalError", 500),
        ("RequestTimeout", 400),
        ("TooManyRequests", 429),
        ("Whatever", 429),
        ("Whatever", 408),
        ("RequestTimeTooSkewed", 403),
        ("ExpiredToken", 400),
        ("ServiceUnavailable", 503),
        ("", 0),
    ],
)
def test_throttling_timeouts_and_5xx_are_transient(code: str, status: int) -> None:
    err = _mapped(_client_error(code, status))
    assert type(err) is StorageError and err.retryable


def test_connection_errors_are_transient_and_not_found_and_conflicts_keep_their_codes() -> None:
    assert _mapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")).retryable
    assert type(_mapped(_client_error("NoSuchKey", 404))) is ObjectNotFoundError
    assert type(_mapped(_client_error("PreconditionFailed", 412))) is VersionConflictError
