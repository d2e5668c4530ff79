"""``worker.service.bulk.bulk`` and the bulk finaliser on the fake runtime: children by manifest line, bad rows failing
alone (with their line for the report), a subject listed again later refused, the cursor and byte-offset resume
point across hand-overs (time budget, backpressure), and the manifest location check before any S3 request."""

from __future__ import annotations

import json

import pytest
from service_fakes import BUCKET, INPUTS, FakeDispatch, FakeRuntime
from service_helpers import enroll_job, job, new_id, run_enroll

from worker.contracts import BulkJob, BulkResult, EnrollJob, JobStatus, child_job_id, job_from_wire
from worker.errors import ForbiddenInputError, MalformedJobError
from worker.service import bulk as bulk_mod
from worker.service.bulk import bulk
from worker.service.clock import now
from worker.service.enrol import enroll
from worker.service.fanout import report_bulk_child

IMG = "s3://out-inputs/tenants/acme/in"


def bulk_job(rt: FakeRuntime, fmt: str, body: str, chunk_size: int = 2, tenant: str = "acme") -> BulkJob:
    uri = rt.put_input(tenant, f"manifests/{new_id('m')}.{fmt}", body.encode())
    bj: BulkJob = job(
        kind="bulk", tenant=tenant, key_id="k1", chunk_size=chunk_size, manifest={"format": fmt, "uri": uri}
    )
    return bj


def run_bulk(rt: FakeRuntime, j: BulkJob, dispatch: FakeDispatch, continuation: int = 0) -> BulkResult:
    return bulk(rt, j, 1, now(), dispatch, continuation)


def run_to_end(rt: FakeRuntime, j: BulkJob, dispatch: FakeDispatch, limit: int = 100) -> BulkResult:
    for c in range(limit):
        before = len(dispatch.continued)
        res = run_bulk(rt, j, dispatch, c)
        if len(dispatch.continued) == before:
            return res
    raise AssertionError("the bulk job never finished listing")


def lines_of(j: BulkJob, ids: list[str]) -> list[int]:
    by_id = {child_job_id(j.job_id, "line", n): n for n in range(1, 500)}
    return [by_id[i] for i in ids]


def csv_manifest(subjects: list[str], bad_at: frozenset[int] = frozenset()) -> str:
    rows = ["subject,image"]
    for i, s in enumerate(subjects):
        rows.append(f"bad/{s},{IMG}/{s}.png" if i in bad_at else f"{s},{IMG}/{s}.png")
    return "\n".join(rows) + "\n"


def test_children_carry_their_manifest_line_and_bad_rows_fail_alone(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    j = bulk_job(rt, "csv", csv_manifest(["a", "b", "c", "d"], bad_at=frozenset({2})), chunk_size=10)
    res = run_bulk(rt, j, dispatch)
    assert res.status == JobStatus.RUNNING and res.total == 4  # the children still run
    assert lines_of(j, [cid for cid, _ in dispatch.enrolls]) == [2, 3, 5]  # the header is line 1
    children = [job_from_wire(w) for _, w in dispatch.enrolls]
    assert [(c.subject, c.key_id, [i.uri for i in c.images]) for c in children] == [
        ("a", "k1", [f"{IMG}/a.png"]),
        ("b", "k1", [f"{IMG}/b.png"]),
        ("d", "k1", [f"{IMG}/d.png"]),
    ]
    assert all(c.job_id == cid for c, (cid, _) in zip(children, dispatch.enrolls, strict=True))
    failures = rt.book.failures(j.ref)
    assert list(failures.values()) == ["malformed_job"] and lines_of(j, list(failures)) == [4]
    (detail,) = rt.book.error_details(j.ref, list(failures)).values()
    assert (detail["line"], detail["code"]) == (4, "malformed_job")


def test_a_subject_listed_again_after_another_is_refused_at_its_later_line(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    body = "\n".join(json.dumps({"subject": s, "images": [f"{IMG}/{s}{i}.png"]}) for i, s in enumerate("abac")) + "\n"
    j = bulk_job(rt, "jsonl", body, chunk_size=1)  # the repeat arrives in a later chunk than the first "a"
    run_to_end(rt, j, dispatch)
    assert [job_from_wire(w).subject for _, w in dispatch.enrolls] == ["a", "b", "c"]
    failures = rt.book.failures(j.ref)
    assert lines_of(j, list(failures)) == [3]
    (detail,) = rt.book.error_details(j.ref, list(failures)).values()
    assert detail["subject"] == "a" and "line 1" in detail["message"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_hand_overs_resume_at_the_saved_byte_offset_and_send_each_row_once(
    rt: FakeRuntime, dispatch: FakeDispatch, fmt: str
) -> None:
    subjects = [f"s{i:02d}" for i in range(1, 12)]
    if fmt == "csv":
        body = csv_manifest(subjects, bad_at=frozenset({4}))
    else:
        rows = [json.dumps({"subject": s, "images": [f"{IMG}/{s}.png"]}) for s in subjects]
        rows[4] = '{"subject": "bad/one", "images": []}'
        body = "\n".join(rows) + "\n"
    one_pass = FakeDispatch()
    run_to_end(rt, bulk_job(rt, fmt, body, chunk_size=100), one_pass)

    rt.settings.worker.fanout_time_budget = 0.0  # hand over after every chunk
    j = bulk_job(rt, fmt, body, chunk_size=3)
    rt.s3.ranges.clear()
    run_to_end(rt, j, dispatch)
    assert len(dispatch.continued) >= 3 and all(cd == 0 for _, cd in dispatch.continued)
    sent = lines_of(j, [cid for cid, _ in dispatch.enrolls])
    assert sent == sorted(set(sent))  # each row once, in order
    assert [job_from_wire(w).subject for _, w in dispatch.enrolls] == [
        job_from_wire(w).subject for _, w in one_pass.enrolls
    ]
    manifest_key = j.manifest.uri.split("/", 3)[3]
    ranges = [r for k, r in rt.s3.ranges if k == manifest_key and (r is None or not r.endswith(f"-{_header_end()}"))]
    assert ranges[0] is None  # the first task reads from the start
    offsets = [int(r.removeprefix("bytes=").split("-")[0]) for r in ranges[1:] if r is not None]
    assert len(offsets) == len(ranges) - 1 and offsets == sorted(offsets) and offsets[0] > 0
    final = rt.book.get_fields(j.ref)
    assert final["listing"] == "done" and int(final["total"]) == len(subjects)


def _header_end() -> int:
    return len("subject,image\n") - 1  # the CSV header, read again with its own ranged GET


def test_a_deep_engine_queue_pauses_the_stream(rt: FakeRuntime) -> None:
    dispatch = FakeDispatch(queue_depth=10**6)
    j = bulk_job(rt, "csv", csv_manifest([f"s{i}" for i in range(6)]), chunk_size=2)
    res = run_bulk(rt, j, dispatch)
    assert res.status == JobStatus.RUNNING and res.total is None
    assert len(dispatch.enrolls) == 2 and dispatch.continued == [(1, bulk_mod.BULK_PAUSE_S)]
    for c in (1, 2, 3):  # continuations while the queue stays deep send nothing more: they wait again
        res = run_bulk(rt, j, dispatch, c)
        assert res.status == JobStatus.RUNNING and len(dispatch.enrolls) == 2
        assert dispatch.continued[-1] == (c + 1, bulk_mod.BULK_PAUSE_S)
    dispatch.queue_depth = 0
    run_to_end(rt, j, dispatch)
    assert len(dispatch.enrolls) == 6


@pytest.mark.parametrize(
    "where", [f"s3://{INPUTS}/tenants/beta/m.csv", f"s3://{BUCKET}/tenants/acme/m.csv", "s3://elsewhere/m.csv"]
)
def test_a_manifest_outside_the_tenant_is_refused_before_any_s3_request(
    rt: FakeRuntime, dispatch: FakeDispatch, where: str
) -> None:
    j: BulkJob = job(kind="bulk", tenant="acme", key_id="k1", manifest={"format": "csv", "uri": where})
    rt.s3.calls.clear()
    with pytest.raises(ForbiddenInputError):
        run_bulk(rt, j, dispatch)
    assert rt.s3.calls == [] and not rt.book.exists(j.ref)


def test_a_bad_csv_header_refuses_the_whole_manifest(rt: FakeRuntime, dispatch: FakeDispatch) -> None:
    j = bulk_job(rt, "csv", "name,picture\na,s3://x/y.png\n")
    with pytest.raises(MalformedJobError):
        run_bulk(rt, j, dispatch)
    assert dispatch.enrolls == [] and rt.book.get_fields(j.ref)["state"] == "failed"


def test_children_reporting_finish_the_job_with_a_report_of_failed_rows(
    rt: FakeRuntime, dispatch: FakeDispatch
) -> None:
    """The children really run (enrolments on the fake runtime) and report; the last one writes the result and the
    report (every failed row with its line, sorted)."""
    subjects = ["ann", "bob", "cy"]
    images = {s: enroll_job(rt, s, person=i).images[0].uri for i, s in enumerate(subjects)}
    images["bob"] = f"{IMG}/missing.png"  # bob's photo is not there: his enrolment fails
    body = "subject,image\n" + "".join(f"{s},{images[s]}\n" for s in subjects) + "bad/x,s3://a/b.png\n"
    j = bulk_job(rt, "csv", body, chunk_size=10)
    run_to_end(rt, j, dispatch)
    assert rt.book.get_result(j.ref) is None
    for cid, wire in dispatch.enrolls:
        child: EnrollJob = job_from_wire(wire)
        try:
            result = enroll(rt, child, 1, now())
        except Exception as e:
            from worker.contracts import EnrollResult, JobError

            result = EnrollResult(
                job_id=cid,
                tenant="acme",
                subject=child.subject,
                status=JobStatus.FAILED,
                attempts=1,
                error=JobError(code=e.code, message=str(e)),  # type: ignore[attr-defined]
            )
        report_bulk_child(rt, "acme", j.job_id, cid, result)
    final = BulkResult.model_validate(rt.book.get_result(j.ref))
    assert (final.status, final.total, final.succeeded, final.failed) == (JobStatus.FAILED, 4, 2, 2)
    assert {k.value: v for k, v in final.errors_by_code.items()} == {"object_not_found": 1, "malformed_job": 1}
    assert final.report_uri is not None
    key = final.report_uri.split("/", 3)[3]
    rows = [json.loads(x) for x in rt.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines()]
    assert [(r["line"], r["subject"], r["code"]) for r in rows] == [
        (3, "bob", "object_not_found"),
        (5, None, "malformed_job"),
    ]
    csv_key = key.removesuffix(".jsonl") + ".csv"
    assert rt.s3.get_object(Bucket=BUCKET, Key=csv_key)["Body"].read().decode().splitlines()[0] == (
        "line,subject,code,message,job_id"
    )
    assert run_enroll(rt, enroll_job(rt, "ann", person=0)).version == 2  # the children's versions are real


def test_a_prefix_manifest_hands_over_and_lists_after_its_last_key(
    rt: FakeRuntime, dispatch: FakeDispatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix listing that matches little stops at its time budget between matches; the continuation lists after
    the last key seen (``StartAfter``): the same children and line numbers as one pass."""
    from worker.contracts import manifest as manifest_rows

    monkeypatch.setattr(manifest_rows, "HEARTBEAT_KEYS", 5)
    for k in range(3):  # per subject: 8 keys the rule skips, then its 2 photos
        for n in range(8):
            rt.put_input("acme", f"pre/g{k}/n{n}.txt", b"x")
        for m in range(2):
            rt.put_input("acme", f"pre/g{k}/z/s{k}-{m}.jpg", b"x")
    rule = r"^g\d/z/(?P<subject>s\d)-\d\.jpg$"
    manifest = {"format": "prefix", "uri": f"s3://{INPUTS}/tenants/acme/pre/", "naming_rule": rule}

    def children(j: BulkJob, d: FakeDispatch) -> list[tuple[int, str, list[str]]]:
        out = []
        for (_, w), n in zip(d.enrolls, lines_of(j, [c for c, _ in d.enrolls]), strict=True):
            child = job_from_wire(w)
            out.append((n, child.subject, [i.key.rsplit("/", 1)[1] for i in child.images]))
        return out

    one: BulkJob = job(kind="bulk", tenant="acme", key_id="k1", chunk_size=1, manifest=manifest)
    once = FakeDispatch()
    run_to_end(rt, one, once)
    expect = [(f"s{k}", [f"s{k}-0.jpg", f"s{k}-1.jpg"]) for k in range(3)]
    assert [(s, imgs) for _, s, imgs in children(one, once)] == expect

    rt.settings.worker.fanout_time_budget = 0.0
    j: BulkJob = job(kind="bulk", tenant="acme", key_id="k1", chunk_size=1, manifest=manifest)
    rt.s3.start_afters.clear()
    run_to_end(rt, j, dispatch)
    assert len(dispatch.continued) >= 3
    assert children(j, dispatch) == children(one, once)
    starts = [after for prefix, after in rt.s3.start_afters if prefix == "tenants/acme/pre/"]
    assert len(starts) == len(dispatch.continued) + 1 and starts[0] is None
    assert all(a is not None for a in starts[1:]) and starts[1:] == sorted(starts[1:])  # never from the start again
