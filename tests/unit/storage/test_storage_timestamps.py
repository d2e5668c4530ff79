"""The S3 client's timestamp parser (listings parse one LastModified per key): the same datetimes as botocore's."""

from __future__ import annotations

from datetime import datetime

import pytest
from botocore.utils import parse_timestamp as botocore_parse

from worker.storage.client import make_s3_client, parse_timestamp


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-30T08:30:00.000Z",  # ListObjectsV2 (AWS, SeaweedFS)
        "2026-11-30T08:30:00Z",
        "2026-11-30T08:30:00.123456+00:00",
        "2026-11-30T09:30:00+01:00",
        "Mon, 30 Nov 2026 08:30:00 GMT",  # Last-Modified header of GET/HEAD
        "1796027400",  # epoch seconds
        1796027400,
    ],
)
def test_parses_like_botocore(value: object) -> None:
    got = parse_timestamp(value)
    assert got.tzinfo is not None and got == botocore_parse(value)


def test_an_iso_time_without_a_zone_is_left_to_botocore() -> None:
    value = "2026-11-30T08:30:00.000"
    assert parse_timestamp(value) == botocore_parse(value) == datetime(2026, 11, 30, 8, 30)


def test_the_client_uses_it() -> None:
    from worker.settings import S3Settings

    client = make_s3_client(S3Settings(endpoint_url="http://127.0.0.1:9"))
    parser = client._endpoint._response_parser_factory.create_parser("rest-xml")
    assert parser._timestamp_parser is parse_timestamp
