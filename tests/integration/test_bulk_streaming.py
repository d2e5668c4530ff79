"""Bulk streaming: a continuation starts with a ranged GET at its saved byte offset (nothing before it is read
again), child job IDs (line numbers) are those of a single pass however often the stream is handed over, and the
children sent from pre-rendered list items are the ones ``send_task`` would push. Real Redis + SeaweedFS."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


class _Task:
    def __init__(self) -> None:
        self.continued: list[dict] = []

    def apply_async(self, **kw: object) -> None:
        self.continued.append(kw)


@pytest.fixture
def rt(make_settings, redis_url: str, seaweed, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    """In-process runtime on its own Redis database (flushed afterwards): the children these bulks queue and the
    parents they leave open must not reach other tests' workers or progress metrics. Manifests go to the tenant's
    input prefix in the default input bucket (``<bucket>-inputs``), where bulk jobs may read them."""
    from worker.tasks import runtime

    seaweed.client().create_bucket(Bucket=f"{s3_bucket}-inputs")
    url = redis_url.rsplit("/", 1)[0] + "/4"
    r = runtime.WorkerRuntime(make_settings(bucket=s3_bucket, redis={"url": url}))
    monkeypatch.setattr(runtime, "_runtime", r)
    yield r
    r.redis.flushdb()


def _job(rt, fmt: str, body: bytes, chunk_size: int):
    from worker_harness import job_id as new_id

    from worker.contracts import job_from_wire

    return job_from_wire(
        {
            "kind": "bulk",
            "job_id": new_id("bk"),
            "tenant": "acme",
            "key_id": "k1",
            "chunk_size": chunk_size,
            "manifest": {"format": fmt, "uri": put_manifest(rt, f"{new_id('m')}.{fmt}", body)},
        }
    )


def put_manifest(rt, name: str, body: bytes, tenant: str = "acme") -> str:
    """Put a manifest in ``tenant``'s input prefix; returns its s3:// URI."""
    bucket, key = f"{rt.settings.s3.bucket}-inputs", f"tenants/{tenant}/manifests/{name}"
    rt.store.client.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


def _bulk(rt, job, task, continuation: int):
    """One run of the bulk task's service function, sending through the tasks' Celery dispatch."""
    from worker.service import bulk
    from worker.service.clock import now
    from worker.tasks import control_tasks

    return bulk.bulk(rt, job, 1, now(), control_tasks.CeleryDispatch(task, job.job_id, rt.redis), continuation)


def _run(rt, monkeypatch, job, budget: float, max_tasks: int = 10_000) -> tuple[list[str], list[dict]]:
    """Run the bulk task and its continuations to the end; returns (child IDs sent, GET calls made)."""
    from worker.tasks import control_tasks

    sent: list[str] = []
    gets: list[dict] = []
    # task IDs are job references (tenant/job_id): the child job IDs are what follows the tenant
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw["task_id"].split("/", 1)[1]))
    monkeypatch.setattr(rt.settings.worker, "fanout_time_budget", budget)
    real_get = rt.store.client.get_object

    def get_object(**kw):
        gets.append(kw)
        return real_get(**kw)

    monkeypatch.setattr(rt.store.client, "get_object", get_object)
    task = _Task()
    for c in range(max_tasks):
        before = len(task.continued)
        _bulk(rt, job, task, c)
        if len(task.continued) == before:
            return sent, gets
    raise AssertionError("bulk never finished")


def _line_numbers(parent: str, ids) -> list[int]:
    from worker.contracts import child_job_id

    by_id = {child_job_id(parent, "line", n): n for n in range(1, 300)}
    return [by_id[i] for i in ids]


NASTY_CSV = (
    "subject,image\r\n"
    "ann,s3://bkt/in/a1.jpg\r\n"
    "ann,s3://bkt/in/a2.jpg\r\n"
    "\r\n"
    "bob,s3://bkt/in/b1.jpg\r\n"
    'bob,"s3://bkt/in/b\n2.jpg"\r\n'  # a quoted field over two physical lines
    "cy,s3://bkt/in/" + "x" * 70_000 + ".jpg\r\n"  # longer than a manifest line may be: fails alone
    "cy,s3://bkt/in/c2.jpg\r\n"
    "dé,s3://bkt/in/d\u00e9.jpg\r\n"  # multi-byte UTF-8
    "bad/subject,s3://bkt/in/e.jpg\r\n"
    "fay,s3://bkt/in/f1.jpg\r\n"
    "gus,s3://bkt/in/g1.jpg"  # no final newline
)


def _nasty_jsonl() -> str:
    rows = []
    for i in range(1, 12):
        rows.append(json.dumps({"subject": f"s{i}", "images": [f"s3://bkt/in/{i}.jpg"]}, ensure_ascii=False))
        if i == 3:
            rows.append("")  # a blank line
        if i == 5:
            rows.append('{"subject": "bad/one", "images": []}')
        if i == 7:
            rows.append('{"subject": "long", "images": ["s3://bkt/in/' + "y" * 70_000 + '.jpg"]}')
        if i == 8:
            rows.append(json.dumps({"subject": "zoë", "images": ["s3://bkt/in/z.jpg"]}, ensure_ascii=False))
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_handed_over_stream_sends_the_children_of_one_pass(rt, monkeypatch, fmt: str, chunk_size: int) -> None:
    body = (NASTY_CSV if fmt == "csv" else _nasty_jsonl()).encode("utf-8")
    one = _job(rt, fmt, body, chunk_size)
    whole, _ = _run(rt, monkeypatch, one, budget=3600.0)
    many = _job(rt, fmt, body, chunk_size)
    pieces, gets = _run(rt, monkeypatch, many, budget=0.0)  # hand over after every chunk
    assert len(gets) > 2  # it really was handed over
    assert sorted(set(_line_numbers(many.job_id, pieces))) == sorted(_line_numbers(one.job_id, whole))
    assert len(whole) == len(set(whole)) and len(set(pieces)) == len(whole)
    p1, p2 = rt.book.progress(one.ref), rt.book.progress(many.ref)
    assert p2.total == p1.total and p2.failed == p1.failed and p2.failed_codes == p1.failed_codes
    f1, f2 = rt.book.failures(one.ref), rt.book.failures(many.ref)
    assert sorted(_line_numbers(one.job_id, f1)) == sorted(_line_numbers(many.job_id, f2))


def test_child_ids_keep_their_line_numbers(rt, monkeypatch) -> None:
    from worker.contracts import child_job_id

    job = _job(rt, "csv", NASTY_CSV.encode(), 2)
    sent, _ = _run(rt, monkeypatch, job, budget=0.0)
    # a line is a row: groups at 2 (ann), 5 (bob, its good row), 9 (cy), 12 (fay), 13 (gus); failed alone, each at
    # its own line: 6 (a quote left open), 7 (the rest of that quote: one column), 8 (too long), 10 (dé), 11 (bad/)
    assert sorted(set(sent)) == sorted(child_job_id(job.job_id, "line", n) for n in (2, 5, 9, 12, 13))
    failed = rt.book.failures(job.ref)
    assert set(failed) == {child_job_id(job.job_id, "line", n) for n in (6, 7, 8, 10, 11)}
    details = rt.book.error_details(job.ref, list(failed))
    assert sorted(d["line"] for d in details.values()) == [6, 7, 8, 10, 11]
    assert {d["line"]: d["subject"] for d in details.values()}[6] == "bob"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_continuation_starts_with_a_ranged_get_at_its_byte_offset(rt, monkeypatch, fmt: str) -> None:
    """The saved offset is exactly the bytes of the rows already sent; the continuation's GET starts there (the CSV
    header is fetched on its own, by a range over its bytes), so its start cost does not depend on the cursor."""
    n = 400
    if fmt == "csv":
        head = "subject,image\n"
        rows = [f"s{i:04d},s3://bkt/in/{i}.jpg\n" for i in range(1, n + 1)]
    else:
        head = ""
        rows = [json.dumps({"subject": f"s{i:04d}", "images": [f"s3://bkt/in/{i}.jpg"]}) + "\n" for i in range(1, n)]
    body = (head + "".join(rows)).encode()
    job = _job(rt, fmt, body, 50)
    sent, gets = _run(rt, monkeypatch, job, budget=0.0)
    ranges = [g.get("Range") for g in gets]
    assert ranges[0] is None  # the first task reads from the start
    data_ranges = [r for r in ranges[1:] if not r.startswith("bytes=0-")]
    # each continuation starts after the last row its predecessor sent: CSV groups are complete only once the next
    # subject is read, so the offset is the start of the row after the 50th (the 51st is read again, not resent)
    expect = [len(head) + sum(len(r) for r in rows[: 50 * k]) for k in range(1, len(data_ranges) + 1)]
    assert data_ranges == [f"bytes={o}-" for o in expect]
    if fmt == "csv":
        assert ranges[1:].count(f"bytes=0-{len(head) - 1}") == len(data_ranges)  # the header, on its own
    assert len(set(sent)) == len(rows) and len(sent) == len(rows)  # nothing sent twice, nothing skipped
    assert rt.book.progress(job.ref).total == len(rows)


def test_children_from_the_template_are_what_send_task_pushes(rt, monkeypatch) -> None:
    """The pre-rendered list items of bulk children equal those Celery's ``send_task`` pushes (delivery tag aside)."""
    import redis

    from worker.contracts import EnrollJob, child_job_id, to_wire
    from worker.tasks import control_tasks

    r = redis.Redis.from_url(control_tasks.app.conf.broker_url)  # where the app publishes (drained below)
    parent = "bk-template-check"
    pending = [
        (
            child_job_id(parent, "line", n),
            to_wire(
                EnrollJob(
                    job_id=child_job_id(parent, "line", n),
                    tenant="acme",
                    subject=f"s{n}",
                    images=[f"s3://bkt/in/{n}.jpg"],
                    key_id="k1",
                )
            ),
        )
        for n in (2, 3, 7)
    ]

    def pushed() -> list[dict]:
        raw = r.lrange("engine.bulk", 0, -1)
        r.delete("engine.bulk")
        out = [json.loads(x) for x in reversed(raw)]
        for item in out:
            assert item["properties"].pop("delivery_tag")
            assert isinstance(item["headers"].pop("sent_at", 0.0), float)  # the worker's metrics stamp it
        return out

    r.delete("engine.bulk")
    fast = control_tasks.CeleryDispatch(None, parent, r)
    fast.send_enrolls(pending)
    assert fast.children.refused == []
    by_template = pushed()
    real = control_tasks.app.send_task
    monkeypatch.setattr(control_tasks.app, "send_task", lambda *a, **kw: real(*a, **kw))  # wrapped: no template
    slow = control_tasks.CeleryDispatch(None, parent, r)
    slow.send_enrolls(pending)
    assert slow.children.refused == [(control_tasks.TASK_ENROLL, "engine.bulk")]
    by_send_task = pushed()
    assert len(by_template) == 3
    for a, b in zip(by_template, by_send_task, strict=True):
        assert a == b
    assert by_template[1]["headers"]["id"] == f"acme/{pending[1][0]}"
    assert by_template[1]["headers"]["argsrepr"].endswith(f"{pending[1][0]}>]")


@pytest.mark.parametrize(
    ("fmt", "where"),
    [
        ("prefix", "s3://{out}/tenants/beta/"),
        ("prefix", "s3://{inb}/tenants/beta/"),
        ("prefix", "s3://{inb}/tenants/acm"),
        ("csv", "s3://{inb}/tenants/beta/m.csv"),
        ("jsonl", "s3://{out}/tenants/acme/m.jsonl"),
    ],
)
def test_a_manifest_outside_the_tenant_is_refused_before_any_s3_request(rt, monkeypatch, fmt: str, where: str) -> None:
    """The confinement check runs before the first request: no GET, no LIST, no HEAD reaches S3 (spied on the real
    client), so a refusal says nothing about what exists there; nothing is recorded in the job book."""
    from worker_harness import job_id as new_id

    from worker.contracts import job_from_wire
    from worker.errors import ForbiddenInputError

    calls: list[str] = []
    for name in ("get_object", "list_objects_v2", "head_object", "get_paginator"):
        real = getattr(rt.store.client, name)
        monkeypatch.setattr(rt.store.client, name, lambda *a, _n=name, _r=real, **kw: calls.append(_n) or _r(*a, **kw))
    from worker.tasks import control_tasks

    uri = where.format(out=rt.settings.s3.bucket, inb=f"{rt.settings.s3.bucket}-inputs")
    inputs = f"s3://{rt.settings.s3.bucket}-inputs/tenants/acme/"
    ok = put_manifest(rt, f"ok.{fmt}", b"subject,image\n") if fmt != "prefix" else inputs
    job = job_from_wire(
        {
            "kind": "bulk",
            "job_id": new_id("bk"),
            "tenant": "acme",
            "key_id": "k1",
            "manifest": {"format": fmt, "uri": uri},
        }
    )
    with pytest.raises(ForbiddenInputError, match="outside the inputs allowed for tenant acme"):
        _bulk(rt, job, _Task(), 0)
    assert calls == [] and not rt.book.exists(job.ref)
    allowed = job.model_copy(update={"job_id": new_id("bk"), "manifest": job.manifest.model_copy(update={"uri": ok})})
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: None)
    _bulk(rt, allowed, _Task(), 0)
    assert calls  # the spy sees the requests of an allowed manifest


def test_a_prefix_listing_that_matches_little_hands_over_and_resumes_after_its_last_key(rt, monkeypatch) -> None:
    """A prefix manifest whose rule matches few of many keys stops at its time budget even between matches, and the
    continuation lists after the last key seen (``StartAfter``), never from the start: the same children, line
    numbers and failures as one pass."""
    from worker_harness import job_id as new_id

    from worker.contracts import job_from_wire
    from worker.contracts import manifest as manifest_rows

    monkeypatch.setattr(manifest_rows, "HEARTBEAT_KEYS", 20)
    inb = f"{rt.settings.s3.bucket}-inputs"
    for k in range(4):  # per subject: 36 keys the rule skips, then its 2 photos; the listing is mostly noise
        for j in range(36):
            rt.store.client.put_object(Bucket=inb, Key=f"tenants/acme/pre/g{k}/n{j:03d}.txt", Body=b"x")
        for m in range(2):
            rt.store.client.put_object(Bucket=inb, Key=f"tenants/acme/pre/g{k}/z/s{k}-{m}.jpg", Body=b"x")
    uri = f"s3://{inb}/tenants/acme/pre/"

    def job():
        return job_from_wire(
            {
                "kind": "bulk",
                "job_id": new_id("px"),
                "tenant": "acme",
                "key_id": "k1",
                "chunk_size": 1,
                "manifest": {"format": "prefix", "uri": uri, "naming_rule": r"^g\d/z/(?P<subject>s\d)-\d\.jpg$"},
            }
        )

    lists: list[dict] = []
    real = rt.store.client.get_paginator

    def paginator(name):
        p = real(name)
        orig = p.paginate

        def paginate(**kw):
            lists.append(kw)
            return orig(**kw)

        p.paginate = paginate
        return p

    monkeypatch.setattr(rt.store.client, "get_paginator", paginator)
    one = job()
    whole, _ = _run(rt, monkeypatch, one, budget=3600.0)
    assert len(lists) == 1
    lists.clear()
    many = job()
    pieces, _ = _run(rt, monkeypatch, many, budget=0.0)
    starts = [kw.get("StartAfter") for kw in lists]
    assert len(starts) > 5 and starts[0] is None and all(starts[1:])  # every continuation lists after a key
    assert starts[1:] == sorted(starts[1:])
    assert sorted(set(_line_numbers(many.job_id, pieces))) == sorted(_line_numbers(one.job_id, whole))
    assert len(pieces) == len(set(pieces)) == len(whole) == 4  # s0 .. s3, two images each, each sent once
    p1, p2 = rt.book.progress(one.ref), rt.book.progress(many.ref)
    assert p1.total == p2.total == 4 and p1.failed == p2.failed == 0
