"""Validating many jobs at once (``jobs_from_wire``, ``Client.validate_many``) gives the models and, for a batch with
bad jobs, the very error that validating them one by one gives; ``to_wire_many`` is ``to_wire`` of each."""

from __future__ import annotations

from typing import Any

import pytest

from producers.client import Client
from worker.contracts import EnrollJob, job_from_wire, jobs_from_wire, to_wire, to_wire_many
from worker.errors import MalformedJobError

GOOD: list[dict[str, Any]] = [
    {
        "kind": "enroll",
        "job_id": "job-0001",
        "tenant": "acme",
        "subject": "ann",
        "images": ["s3://bkt/a.jpg"],
        "key_id": "k",
    },
    {
        "kind": "verify",
        "job_id": "job-0002",
        "tenant": "acme",
        "subject": "ann",
        "probe": "s3://bkt/p.jpg",
        "far": 0.001,
    },
    {
        "kind": "verify",
        "job_id": "job-0003",
        "tenant": "acme",
        "subject": "ann",
        "probe": "s3://bkt/p.jpg",
        "threshold": 1,
    },
    {"kind": "revoke", "job_id": "job-0004", "tenant": "acme", "key_id": "k", "new_key_id": "k2", "reason": "leak"},
    {"kind": "erase", "job_id": "job-0005", "tenant": "acme", "subject": "ann", "reason": "asked"},
    {
        "kind": "bulk",
        "job_id": "job-0006",
        "tenant": "acme",
        "key_id": "k",
        "manifest": {"format": "prefix", "uri": "s3://bkt/in/", "naming_rule": "^(?P<subject>[a-z]+)/.*$"},
        "chunk_size": 10,
    },
    {
        "kind": "enroll",
        "job_id": "job-0007",
        "tenant": "acme",
        "subject": "cy",
        "images": ["s3://bkt/é ü.jpg"],
        "key_id": "k",
    },
]
BAD: list[Any] = [
    {**GOOD[0], "subject": "no/slash"},
    {**GOOD[0], "subject": "é"},
    {**GOOD[0], "images": ["s3://bkt/a.jpg", "s3://bkt/a.jpg"]},
    {**GOOD[0], "images": ("s3://bkt/t.jpg",)},  # a tuple is a JSON array: valid one by one, so valid here too
    {**GOOD[0], "extra": 1},
    {**GOOD[1], "far": 0.1, "threshold": 0.2},
    {**GOOD[0], "images": [b"s3://bkt/a.jpg"]},  # not JSON at all
    {**GOOD[0], "images": ["s3://bkt/../a.jpg"]},
    {**GOOD[0], "images": ["s3://bkt/./a.jpg"]},
    {**GOOD[0], "images": ["s3://bkt/a/."]},
    "not a dict",
    {},
]


def one_by_one(items: list[Any]) -> list[Any] | str:
    try:
        return [job_from_wire(d) for d in items]
    except MalformedJobError as e:
        return str(e)


def in_a_batch(items: list[Any]) -> list[Any] | str:
    try:
        return jobs_from_wire(items)
    except MalformedJobError as e:
        return str(e)


def test_a_good_batch_gives_the_models_of_one_by_one() -> None:
    got = jobs_from_wire(GOOD)
    assert got == [job_from_wire(d) for d in GOOD]
    assert [type(m) for m in got] == [type(job_from_wire(d)) for d in GOOD]


@pytest.mark.parametrize("bad", range(len(BAD)))
@pytest.mark.parametrize("at", [0, 3, len(GOOD)])
def test_a_bad_job_raises_what_it_raises_alone(bad: int, at: int) -> None:
    items = [*GOOD[:at], BAD[bad], *GOOD[at:], BAD[0]]
    expected = one_by_one(items)
    assert in_a_batch(items) == expected
    if isinstance(expected, str):  # the first bad one is named, as one by one
        assert expected == one_by_one([BAD[bad]]) or bad == 3


def test_a_bad_s3_key_segment_is_refused_and_dots_inside_names_are_not() -> None:
    for key in ("a/./b.jpg", "a/../b.jpg", "./b.jpg", "../b.jpg", "a/.", "a/.."):
        with pytest.raises(MalformedJobError, match="'.' or '..' segments"):
            job_from_wire({**GOOD[0], "images": [f"s3://bkt/{key}"]})
    for key in ("a/.b.jpg", "a/..b/c.jpg", "a.../b.jpg", "a/b..", ".x/y"):
        assert job_from_wire({**GOOD[0], "images": [f"s3://bkt/{key}"]}).images[0].key == key


def test_to_wire_many_is_to_wire_of_each() -> None:
    models = jobs_from_wire(GOOD)
    assert to_wire_many(models) == [to_wire(m) for m in models]
    assert [list(w) for w in to_wire_many(models)] == [list(to_wire(m)) for m in models]  # same key order


def test_client_validate_many_takes_models_and_dicts_and_keeps_the_first_error_first() -> None:
    model = EnrollJob.model_validate_json(
        '{"job_id": "job-0100", "tenant": "acme", "subject": "bo", "images": ["s3://bkt/x.jpg"], "key_id": "k"}'
    )
    assert Client.validate_many([model, *GOOD]) == [Client.validate(j) for j in [model, *GOOD]]
    with pytest.raises(MalformedJobError, match="subject"):
        Client.validate_many([model, BAD[0], 42])  # the bad dict comes before the non-job
    with pytest.raises(MalformedJobError, match="expected a job model or dict, got int"):
        Client.validate_many([model, 42, BAD[0]])
