"""Wire contracts: strict validation, JSON round trips, identifier rules, error-code closure, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from worker import errors
from worker.contracts import (
    BulkJob,
    BulkManifest,
    EnrollJob,
    EnrollResult,
    ErrorCode,
    JobError,
    JobStatus,
    ManifestRowError,
    RevokeJob,
    S3Ref,
    VerifyJob,
    VerifyResult,
    child_job_id,
    iter_csv,
    iter_jsonl,
    iter_prefix,
    job_from_wire,
    key_id_path,
    result_from_wire,
    to_json,
    to_wire,
)
from worker.errors import MalformedJobError

JOB = "0123456789abcdef"


def enroll(**kw):
    base = {
        "kind": "enroll",
        "job_id": JOB,
        "tenant": "acme",
        "subject": "alice",
        "images": ["s3://inb/a.jpg"],
        "key_id": "dev-key-1",
    }
    base.update(kw)
    return base


def _all_error_classes(cls=errors.CancelableError):
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_error_classes(sub)


def test_error_codes_match_error_classes_exactly():
    codes = {c.code for c in _all_error_classes() if c.__module__ == "worker.errors"}
    assert codes == {e.value for e in ErrorCode}


def test_contracts_import_neither_torch_nor_boto3():
    code = "import sys, worker.contracts; print(sorted(m for m in ('torch', 'boto3', 'botocore') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "job",
    [
        enroll(),
        {"kind": "verify", "job_id": JOB, "tenant": "acme", "subject": "alice", "probe": "s3://inb/p.png"},
        {"kind": "revoke", "job_id": JOB, "tenant": "acme", "subject": "alice", "reason": "leaked"},
        {
            "kind": "revoke",
            "job_id": JOB,
            "tenant": "acme",
            "key_id": "alias/old",
            "new_key_id": "alias/new",
            "reason": "compromised",
        },
        {
            "kind": "bulk",
            "job_id": JOB,
            "tenant": "acme",
            "key_id": "k",
            "manifest": {"format": "jsonl", "uri": "s3://man/rows.jsonl"},
        },
        {
            "kind": "bulk",
            "job_id": JOB,
            "tenant": "acme",
            "key_id": "k",
            "manifest": {"format": "prefix", "uri": "s3://photos/batch1/"},
        },
    ],
)
def test_round_trip_dict_and_json(job):
    parsed = job_from_wire(job)
    assert parsed.kind == job["kind"]
    assert parsed.schema_version == 1
    again = job_from_wire(to_json(parsed))
    assert again == parsed
    assert job_from_wire(json.dumps(to_wire(parsed)).encode()) == parsed
    assert to_wire(parsed)["job_id"] == JOB


def test_s3ref_is_a_string_on_the_wire():
    j = job_from_wire(enroll(images=["s3://inb/dir/a b.jpg", "s3://inb/b.jpg"]))
    assert isinstance(j, EnrollJob)
    assert j.images[0] == S3Ref(bucket="inb", key="dir/a b.jpg")
    assert to_wire(j)["images"] == ["s3://inb/dir/a b.jpg", "s3://inb/b.jpg"]


@pytest.mark.parametrize(
    "ref",
    [
        "http://in/a.jpg",
        "s3://inb",
        "s3://inb/",
        "s3:///a.jpg",
        "s3://IN/a.jpg",
        "s3://abc/b/../c.jpg",
        "s3://abc/x\n",
        "s3://abc/tenants/acme/..\\x.jpg",  # SeaweedFS reads the backslash as '/': a '..' segment
        "s3://abc/a\\b.jpg",
        "s3://abc/a\x85b.jpg",  # C1 control character
        "s3://a_b/c",
        "s3://192.168.1.1/x",
        "s3://inb//x",
        "s3://inb/" + "k" * 1100,
        5,
        None,
    ],
)
def test_malformed_refs_rejected(ref):
    with pytest.raises(MalformedJobError):
        job_from_wire(enroll(images=[ref]))


@pytest.mark.parametrize(
    "change",
    [
        {"extra_field": 1},
        {"tenant": "a/b"},
        {"tenant": ".."},
        {"subject": "x..y"},
        {"subject": ""},
        {"subject": "a b"},
        {"job_id": "short"},
        {"job_id": "has/slash-123456"},
        {"job_id": 12345678901},
        {"schema_version": 2},
        {"schema_version": "1"},
        {"kind": "delete"},
        {"images": []},
        {"images": ["s3://inb/a.jpg", "s3://inb/a.jpg"]},
        {"images": [f"s3://inb/{i}.jpg" for i in range(65)]},
        {"images": "s3://inb/a.jpg"},
        {"key_id": "../etc"},
        {"key_id": ""},
        # "$" matches before a final newline: these once reached S3 and Redis keys
        {"tenant": "acme\n"},
        {"subject": "s\n"},
        {"job_id": "abcdefgh1234\n"},
        {"key_id": "k1\n"},
        {"images": ["s3://inb\n/a.jpg"]},
    ],
)
def test_malformed_jobs_rejected(change):
    with pytest.raises(MalformedJobError):
        job_from_wire(enroll(**change))


def test_missing_required_and_not_json():
    body = enroll()
    del body["key_id"]
    for bad in (body, "{not json", b"[1,2]", "null", json.dumps({"kind": "enroll"})):
        with pytest.raises(MalformedJobError):
            job_from_wire(bad)
    with pytest.raises(MalformedJobError):
        job_from_wire(b"x" * 2_000_000)


def test_malformed_messages_do_not_echo_input():
    secret = "s3://inb/" + "SENSITIVE-" * 3
    with pytest.raises(MalformedJobError) as ei:
        job_from_wire(enroll(tenant="bad/tenant", images=[secret + "/../x"]))
    assert "SENSITIVE" not in str(ei.value) and "bad/tenant" not in str(ei.value)


def test_strict_types():
    with pytest.raises(MalformedJobError):
        job_from_wire(
            {
                "kind": "verify",
                "job_id": JOB,
                "tenant": "t",
                "subject": "s",
                "probe": "s3://inb/p.png",
                "threshold": "0.5",
            }
        )
    v = job_from_wire(
        {"kind": "verify", "job_id": JOB, "tenant": "t", "subject": "s", "probe": "s3://inb/p.png", "threshold": 0.5}
    )
    assert isinstance(v, VerifyJob) and v.threshold == 0.5


def test_revoke_targets():
    base = {"kind": "revoke", "job_id": JOB, "tenant": "t", "reason": "r"}
    for bad in (
        {},
        {"subject": "s", "key_id": "k", "new_key_id": "n"},
        {"key_id": "k"},
        {"key_id": "k", "new_key_id": "k"},
        {"subject": "s", "reason": ""},
        {"subject": "s", "reason": "a\nb"},
    ):
        with pytest.raises(MalformedJobError):
            job_from_wire({**base, **bad})
    r = job_from_wire({**base, "subject": "s", "new_key_id": "k2", "purge_old_images": True})
    assert isinstance(r, RevokeJob) and r.purge_old_images


def test_bulk_manifest_rules():
    with pytest.raises(ValueError):
        BulkManifest(format="prefix", uri="s3://bkt/p/", naming_rule="(?P<x>.*)")
    with pytest.raises(ValueError):
        BulkManifest(format="prefix", uri="s3://bkt/p/", naming_rule="([")
    with pytest.raises(ValueError):
        BulkManifest(format="csv", uri="s3://bkt/m.csv", naming_rule="(?P<subject>.*)")
    local = BulkManifest(format="csv", uri="/tmp/m.csv")
    assert not local.is_s3
    with pytest.raises(ValueError):  # a queued job needs S3
        BulkJob(job_id=JOB, tenant="t", key_id="k", manifest=local)
    rule = BulkManifest(format="prefix", uri="s3://bkt/p/").rule()
    assert rule.match("alice/001.JPG").group("subject") == "alice"
    assert not rule.match("alice/sub/001.jpg")


def test_manifest_parsers_stream_and_group():
    csv_lines = ["subject,image\n", "alice,s3://bkt/a1.jpg\n", "alice,s3://bkt/a2.jpg\n", "bob,s3://bkt/b1.jpg\n", "\n"]
    rows = list(iter_csv(iter(csv_lines)))
    assert [(r.subject, len(r.images), r.line) for r in rows] == [("alice", 2, 2), ("bob", 1, 4)]
    rows = list(
        iter_jsonl(
            [
                '{"subject": "c", "images": ["s3://bkt/c.jpg"], "key_id": "k2"}',
                "",
                '{"subject": "d", "images": ["s3://bkt/d.jpg"]}',
            ]
        )
    )
    assert [(r.subject, r.key_id, r.line) for r in rows] == [("c", "k2", 1), ("d", None, 3)]
    with pytest.raises(ManifestRowError) as ei:
        list(
            iter_jsonl(
                ['{"subject": "c", "images": ["s3://bkt/c.jpg"]}', '{"subject": "x/y", "images": ["s3://bkt/a"]}']
            )
        )
    assert ei.value.line == 2
    with pytest.raises(MalformedJobError):  # a bad header refuses the whole manifest
        list(iter_csv(["name,path\n"]))
    with pytest.raises(ManifestRowError):
        list(iter_jsonl(['{"subject": "c", "images": ["s3://bkt/c.jpg"], "extra": 1}']))
    keys = ["p/alice/1.jpg", "p/alice/2.png", "p/bob/1.jpg", "p/readme.txt", "p/carl/x.gif"]
    m = BulkManifest(format="prefix", uri="s3://bkt/p/")
    rows = list(iter_prefix("bkt", "p/", keys, m.rule()))
    assert [(r.subject, [i.uri for i in r.images]) for r in rows] == [
        ("alice", ["s3://bkt/p/alice/1.jpg", "s3://bkt/p/alice/2.png"]),
        ("bob", ["s3://bkt/p/bob/1.jpg"]),
    ]


def test_results_round_trip_and_error_mapping():
    err = JobError.from_exception(errors.NoFaceError("no face in s3://inb/a.jpg"))
    assert err.code is ErrorCode.NO_FACE and not err.retryable
    assert JobError.from_exception(errors.StorageError("x")).retryable
    internal = JobError.from_exception(RuntimeError("secret 0xdeadbeef"))
    assert internal.code is ErrorCode.INTERNAL_ERROR and "deadbeef" not in internal.message
    r = EnrollResult(job_id=JOB, status=JobStatus.FAILED, tenant="t", subject="s", error=err)
    assert result_from_wire(to_wire(r)) == r
    v = VerifyResult(
        job_id=JOB, status="succeeded", tenant="t", subject="s", score=0.7, threshold=0.5, decision="accept", version=2
    )
    assert result_from_wire(to_json(v)) == v
    assert JobStatus.DEAD_LETTERED.terminal and not JobStatus.RUNNING.terminal
    with pytest.raises(MalformedJobError):
        result_from_wire({**to_wire(r), "embedding": [0.1]})


def test_child_job_ids_are_deterministic_and_valid():
    a = child_job_id(JOB, "row", 5)
    assert a == child_job_id(JOB, "row", 5) != child_job_id(JOB, "row", 6)
    EnrollJob(job_id=a, tenant="t", subject="s", images=["s3://bkt/k"], key_id="k")
    long = child_job_id("x" * 128, 1)
    EnrollJob(job_id=long, tenant="t", subject="s", images=["s3://bkt/k"], key_id="k")


def test_key_id_path_is_one_segment():
    assert (
        key_id_path("arn:aws:kms:us-east-1:111122223333:key/abc")
        == "arn%3Aaws%3Akms%3Aus-east-1%3A111122223333%3Akey%2Fabc"
    )
    assert "/" not in key_id_path("alias/x")


def test_job_references_name_the_tenant_and_the_job():
    from worker.contracts import job_ref, parse_job_ref

    assert job_ref("acme", "abcdefgh1") == "acme/abcdefgh1"
    assert parse_job_ref("ac.me/abcdefgh1") == ("ac.me", "abcdefgh1")
    for bad in ("abcdefgh1", "acme/", "/abcdefgh1", "../abcdefgh1", "acme/abc", "acme/abcdefgh1/x", "acme\n/abcdefgh1"):
        with pytest.raises(ValueError):
            parse_job_ref(bad)
    job = job_from_wire(enroll())
    assert job.ref == f"{job.tenant}/{job.job_id}"


def test_erase_names_one_target_and_a_tenant_wide_one_repeats_the_tenant():
    base = {"kind": "erase", "job_id": "abcdefgh1", "tenant": "acme", "reason": "consent withdrawn"}
    assert job_from_wire({**base, "subject": "alice"}).subject == "alice"
    assert job_from_wire({**base, "all_subjects": True, "confirm": "acme"}).all_subjects
    for bad in (
        {},  # neither target
        {"subject": "alice", "all_subjects": True, "confirm": "acme"},  # both
        {"all_subjects": True},  # no confirmation
        {"all_subjects": True, "confirm": "acme2"},  # a confirmation that is not the tenant
        {"subject": "alice", "reason": "a\nb"},  # control characters in the reason
    ):
        with pytest.raises(MalformedJobError):
            job_from_wire({**base, **bad})
