"""Bulk manifests as an attacker and a careless user write them (docs/reliability.md), against a real worker.

- A manifest (prefix, CSV, JSONL) in another tenant's prefix or in the output bucket is refused with
  ``forbidden_input`` before any S3 request: nothing listed, nothing read, nothing of the other tenant named; the CLI
  refuses it before queueing (exit 2).
- A naming rule that backtracks catastrophically in a backtracking engine runs in linear time (RE2): the listing ends
  in well under a second and a verify sent right behind it finishes normally; RE2-incompatible rules exit 2.
- Every manifest defect (an over-long field, a quote left open, a subject split over non-adjacent rows, bad rows) is
  a row of the bulk report with its line number; the good rows are enrolled, one enrolment per subject.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest
from test_producers_cli import cli
from worker_harness import Deployment, job_id, running

from worker.contracts import JobStatus

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def _bulk(dep: Deployment, uri: str, fmt: str, naming_rule: str | None = None, tenant: str = "acme") -> str:
    """Queue a bulk job as a raw job (no producer-side checks: the worker must hold on its own)."""
    m = {"format": fmt, "uri": uri, **({"naming_rule": naming_rule} if naming_rule else {})}
    return dep.client.submit(
        {"kind": "bulk", "job_id": job_id("bk"), "tenant": tenant, "key_id": "k1", "chunk_size": 2, "manifest": m}
    )


def _put(dep: Deployment, bucket: str, key: str, body: bytes) -> str:
    dep.s3.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


def test_manifests_outside_the_tenant_are_refused_before_listing(dep: Deployment) -> None:
    c, inb, out = dep.client, dep.input_bucket, dep.bucket
    face = dep.s3.get_object(Bucket=inb, Key="tenants/acme/obama.jpg")["Body"].read()
    secret = ["betasecretsubject", "betastoredsubject", "betaupload"]
    _put(dep, inb, "tenants/beta/uploads/betaupload.jpg", face)
    beta_csv = f"subject,image\nbetasecretsubject,s3://{inb}/tenants/beta/uploads/betaupload.jpg\n".encode()
    _put(dep, inb, "tenants/beta/m.csv", beta_csv)
    _put(dep, out, "tenants/beta/subjects/betastoredsubject/current.json", b'{"version": 1}')
    row = {"subject": "betasecretsubject", "images": [f"s3://{inb}/tenants/beta/uploads/betaupload.jpg"]}
    _put(dep, out, "tenants/acme/m.jsonl", (json.dumps(row) + "\n").encode())  # acme's part of the OUTPUT bucket
    cases = {
        "beta's templates (prefix)": (f"s3://{out}/tenants/beta/", "prefix", r"^subjects/(?P<subject>[^/]+)/"),
        "beta's inputs (prefix)": (f"s3://{inb}/tenants/beta/", "prefix", None),
        "beta's CSV": (f"s3://{inb}/tenants/beta/m.csv", "csv", None),
        "a CSV that does not exist": (f"s3://{inb}/tenants/beta/none.csv", "csv", None),
        "JSONL in the output bucket": (f"s3://{out}/tenants/acme/m.jsonl", "jsonl", None),
        "every tenant's inputs": (f"s3://{inb}/tenants/", "prefix", None),
        "a prefix of acme's prefix": (f"s3://{inb}/tenants/ac", "prefix", r"^me/(?P<subject>[^/]+)\.jpg$"),
    }
    ids = {name: _bulk(dep, uri, fmt, rule) for name, (uri, fmt, rule) in cases.items()}
    for name, jid in ids.items():
        res = c.wait(jid, timeout=120)
        assert res.status == JobStatus.FAILED and res.error.code == "forbidden_input", (name, res)
        assert (res.total, res.enqueued, res.succeeded, res.failed, res.report_uri) == (None, 0, 0, 0, None), name
        assert "outside the inputs allowed for tenant acme" in res.error.message
        stored = json.dumps(c.book.get_result(jid)) + json.dumps(c.book.get_fields(jid))
        assert not any(s in stored for s in secret), (name, stored)
        assert not c.book.exists(jid) and c.book.failures(jid) == {}  # refused before the job book was opened
    # an existing object and a missing one get the same answer: nothing was read to tell them apart
    a, b = (c.book.get_result(ids[n])["error"] for n in ("beta's CSV", "a CSV that does not exist"))
    assert a["code"] == b["code"] and a["message"].replace("m.csv", "none.csv") == b["message"]
    # the producer refuses the same manifests before queueing (exit 2), and a bad naming rule too
    env = dep.env
    for uri, extra in [(f"s3://{out}/tenants/beta/", ["--format", "prefix"]), (f"s3://{inb}/tenants/beta/m.csv", [])]:
        r = cli(["bulk", "--tenant", "acme", "--key", "k1", uri, *extra, "--no-wait"], env, timeout=120)
        assert r.returncode == 2 and "forbidden_input" in r.stderr and r.stdout == "", (r.stdout, r.stderr)
    assert dep.worker.alive()


def test_a_catastrophic_naming_rule_is_linear_and_blocks_nothing(dep: Deployment, tmp_path: Path) -> None:
    """``^(?P<subject>([0-9a-f]+)+)x`` over keys of 60 hex digits: 2^60 paths for a backtracking engine (the worker
    was blocked 162 s by it), microseconds for RE2. The verify queued right behind the bulk job finishes normally."""
    c, inb = dep.client, dep.input_bucket
    enrolled = c.wait(c.submit(c.enroll_job("acme", "obama", [dep.faces["obama"]], "k1")), timeout=300)
    assert enrolled.status == JobStatus.SUCCEEDED, enrolled
    for i in range(200):
        _put(dep, inb, f"tenants/acme/hex/{i:04x}{'0123456789abcdef' * 3}{'a' * 8}.bin", b"x")
    rule = r"^(?P<subject>([0-9a-f]+)+)x"
    t = time.monotonic()
    bulk_id = _bulk(dep, f"s3://{inb}/tenants/acme/hex/", "prefix", rule)
    verify_id = c.submit(c.verify_job("acme", "obama", dep.faces["obama2"]))
    res = c.wait(bulk_id, timeout=120)
    v = c.wait(verify_id, timeout=300)
    assert res.status == JobStatus.SUCCEEDED and res.total == 0 and res.failed == 0, res
    f = c.book.get_fields(bulk_id)
    listing_s = float(f["updated"]) - float(f["created"])  # job opened -> listing done, inside the worker
    assert listing_s < 1.0, f"listing and matching 200 keys took {listing_s:.2f} s"
    print(f"catastrophic rule: 200 keys listed and matched in {listing_s:.3f} s inside the worker")
    assert v.status == JobStatus.SUCCEEDED and v.decision in ("accept", "reject"), v
    assert time.monotonic() - t < 120
    # rules RE2 cannot run in linear time are refused by the producer before queueing
    for bad in [r"^(?P<subject>[0-9a-f]+)\1", r"^(?=x)(?P<subject>.+)$"]:
        r = cli(
            ["bulk", "--tenant", "acme", "--key", "k1", f"s3://{inb}/tenants/acme/hex/", "--naming-rule", bad],
            dep.env,
            timeout=120,
        )
        assert r.returncode == 2 and "RE2" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert dep.worker.alive()


def _report(dep: Deployment, jid: str, fmt: str = "jsonl") -> list[dict]:
    raw = dep.client.report(jid, fmt)
    assert raw is not None
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(raw.decode())))
    return [json.loads(line) for line in raw.decode().splitlines()]


def _versions(dep: Deployment, subject: str) -> tuple[list[int], int]:
    """(committed versions, images in the current version) of acme/subject."""
    st = dep.client.subject("acme", subject)
    assert st is not None, subject
    bucket, key = st.current_manifest_uri[5:].split("/", 1)
    manifest = json.loads(dep.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return st.versions, len(manifest["images"])


def test_manifest_defects_are_reported_by_line_and_good_rows_enrolled(dep: Deployment, tmp_path: Path) -> None:
    c, inb, f = dep.client, dep.input_bucket, dep.faces
    missing = f"s3://{inb}/tenants/acme/missing.jpg"
    body = (
        "subject,image\n"  # 1
        f"ann,{f['obama']}\n"  # 2
        f"ann,{f['obama2']}\n"  # 3
        f'bob,"{f["biden"]}\n'  # 4: a quote left open (used to swallow every row after it)
        f"bob,{f['biden']}\n"  # 5
        f"cy,s3://{inb}/tenants/acme/{'x' * 140_000}.jpg\n"  # 6: a field over csv.field_size_limit
        f"ann,{f['obama3']}\n"  # 7: ann again after other subjects (used to replace ann's 2-photo enrolment)
        f"bad/one,{f['obama']}\n"  # 8: not a subject ID
        f"dee,{missing}\n"  # 9: a good row whose enrolment fails (no such object)
    )
    local = tmp_path / "defects.csv"
    local.write_text(body)
    # the CLI checks a local manifest row by row: exit 2, every bad line named, no traceback, nothing uploaded
    r = cli(["bulk", "--tenant", "acme", "--key", "k1", str(local)], dep.env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for n in (4, 6, 7, 8):
        assert f"line {n}: " in r.stderr, r.stderr
    assert "line 9" not in r.stderr  # a missing object is the worker's to find
    assert "Contents" not in dep.s3.list_objects_v2(Bucket=inb, Prefix="tenants/acme/manifests/")
    # the same manifest in S3: streamed by the worker, bad rows reported, good rows enrolled
    uri = _put(dep, inb, "tenants/acme/manifests/defects.csv", body.encode())
    jid = job_id("bk")
    r = cli(["bulk", "--tenant", "acme", "--key", "k1", uri, "--job-id", jid, "--timeout", "600"], dep.env, timeout=700)
    assert r.returncode == 1, (r.stdout, r.stderr)  # failed rows: the job failed, the good ones are enrolled
    res = c.result(f"acme/{jid}")
    assert (res.total, res.succeeded, res.failed) == (7, 2, 5), res
    assert res.report_uri == f"s3://{dep.bucket}/tenants/acme/jobs/{jid}/report.jsonl"
    assert "line 4: bob: malformed_job: a quoted field is not closed" in r.stdout, r.stdout
    assert f"report {res.report_uri}" in r.stdout and "more failed rows" not in r.stdout
    rows = _report(dep, f"acme/{jid}")
    assert [(x["line"], x["subject"], x["code"]) for x in rows] == [
        (4, "bob", "malformed_job"),
        (6, None, "malformed_job"),  # an over-long line: nothing of it is kept, its subject neither
        (7, "ann", "malformed_job"),
        (8, None, "malformed_job"),
        (9, "dee", "object_not_found"),
    ]
    assert "listed again after other subjects (first at line 2)" in rows[2]["message"]
    assert [(int(x["line"]), x["code"]) for x in _report(dep, f"acme/{jid}", "csv")] == [
        (x["line"], x["code"]) for x in rows
    ]
    assert _versions(dep, "ann") == ([1], 2) and _versions(dep, "bob") == ([1], 1)
    # cancelable report downloads it
    out = tmp_path / "report.jsonl"
    r = cli(["report", f"acme/{jid}", "--out", str(out)], dep.env, timeout=120)
    assert r.returncode == 0 and [json.loads(x) for x in out.read_text().splitlines()] == rows, r.stderr

    lines = [
        json.dumps({"subject": "eve", "images": [f["obama"]]}),  # 1
        '{"subject": "fay", "images": [',  # 2: not JSON
        json.dumps({"subject": "fay", "images": [f["biden"], f["biden"]]}),  # 3: the same ref twice
        json.dumps({"subject": "eve", "images": [f["obama2"]]}),  # 4: eve again
        json.dumps({"subject": "gus", "images": [f["obama3"]]}),  # 5
    ]
    jid = _bulk(dep, _put(dep, inb, "tenants/acme/manifests/d.jsonl", "\n".join(lines).encode()), "jsonl")
    res = c.wait(jid, timeout=600)
    assert (res.total, res.succeeded, res.failed) == (5, 2, 3), res
    assert [(x["line"], x["subject"], x["code"]) for x in _report(dep, jid)] == [
        (2, None, "malformed_job"),
        (3, "fay", "malformed_job"),
        (4, "eve", "malformed_job"),
    ]
    assert _versions(dep, "eve") == ([1], 1) and _versions(dep, "gus") == ([1], 1)
    assert c.subject("acme", "fay") is None
    assert dep.worker.alive()
