"""Crashes mid-job: a pool child SIGKILLed (re-queued at once), the whole worker SIGKILLed and restarted (re-delivered
after the visibility timeout), and a job that kills its worker every time (dead-lettered after max_attempts). Each
completes exactly once: one version in S3, attempts counted from task start."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from worker_harness import Deployment, deploy

from worker.contracts import JobStatus

pytestmark = pytest.mark.integration

VT = 24  # visibility timeout of these workers (s); the hard time limit is below it


@pytest.fixture
def crashy(service_env, seaweed, tmp_path: Path):
    dep = deploy(
        service_env,
        seaweed,
        tmp_path,
        CANCELABLE_WORKER__TASK_TIME_LIMIT=str(VT - 4),
        CANCELABLE_WORKER__VISIBILITY_TIMEOUT=str(VT),
        CANCELABLE_WORKER__MAX_ATTEMPTS="3",
        CANCELABLE_ENGINE__STEPS="20",
    )
    try:
        yield dep
    finally:
        dep.worker.stop()
        dep.client.close()


def _wait_attempt(dep: Deployment, ref: str, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    import redis

    while time.monotonic() < deadline:
        try:
            v = dep.client.redis.get(f"cf:attempts:{ref}")
        except redis.exceptions.TimeoutError:  # an overloaded CI box: keep polling
            continue
        if v is not None and int(v) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"attempt {n} of {ref} never started:\n{dep.worker.tail()}")


def _versions(dep: Deployment, subject: str) -> list[str]:
    r = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix=f"tenants/acme/subjects/{subject}/versions/")
    return [o["Key"].rsplit("/", 1)[-1] for o in r.get("Contents", [])]


def test_pool_child_killed_mid_job_completes_once(crashy: Deployment) -> None:
    dep = crashy
    job = dep.client.enroll_job("acme", "child-kill", [dep.faces["obama"], dep.faces["obama2"]], "k1")
    dep.client.submit(job)
    _wait_attempt(dep, job.ref, 1)
    time.sleep(0.5)  # inside the job (download / align / optimise)
    (child,) = dep.worker.children()
    os.kill(child, signal.SIGKILL)
    res = dep.client.wait(job.ref, timeout=180)
    assert res.status == JobStatus.SUCCEEDED, res
    assert res.attempts == 2 and res.version == 1
    assert _versions(dep, "child-kill") == ["0000000001.json"]
    assert dep.worker.alive() and dep.worker.children() and dep.worker.children() != [child]


@pytest.mark.slow  # waits out the visibility timeout (about 30 s)
def test_whole_worker_killed_mid_job_completes_once_after_restart(crashy: Deployment) -> None:
    dep = crashy
    job = dep.client.enroll_job("acme", "worker-kill", [dep.faces["obama"], dep.faces["obama2"]], "k1")
    dep.client.submit(job)
    _wait_attempt(dep, job.ref, 1)
    time.sleep(0.5)
    dep.worker.kill(signal.SIGKILL)  # main process and pool child at once: nothing gets acked or re-queued
    assert not dep.worker.alive()
    assert dep.client.result(job.ref) is None
    t0 = time.monotonic()
    dep.restart()
    res = dep.client.wait(job.ref, timeout=VT + 120)
    waited = time.monotonic() - t0
    assert res.status == JobStatus.SUCCEEDED, res
    assert res.attempts == 2 and res.version == 1
    assert _versions(dep, "worker-kill") == ["0000000001.json"]
    assert waited >= VT - 8  # came back through the visibility timeout, not a duplicate publish


def test_job_that_keeps_killing_its_worker_is_dead_lettered(crashy: Deployment) -> None:
    dep = crashy
    job = dep.client.enroll_job("acme", "poison", [dep.faces["obama"]], "k1")
    dep.client.submit(job)
    for attempt in (1, 2, 3):  # max_attempts = 3: every start is counted, every one is killed
        _wait_attempt(dep, job.ref, attempt)
        time.sleep(0.3)
        for pid in dep.worker.children():
            os.kill(pid, signal.SIGKILL)
    res = dep.client.wait(job.ref, timeout=180)
    assert res.status == JobStatus.DEAD_LETTERED, res
    assert res.error.code == "dead_lettered" and res.attempts == 3
    dl = dep.client.book.get_dead_letter(job.ref)
    assert dl is not None and dl["attempts"] == 3 and dl["job"]["job_id"] == job.job_id
    s3_dl = json.loads(
        dep.s3.get_object(Bucket=dep.bucket, Key=f"tenants/acme/dead-letters/{job.job_id}.json")["Body"].read()
    )
    assert s3_dl["job_kind"] == "enroll" and s3_dl["attempts"] == 3
    assert job.ref in dep.client.book.dead_letters()
    assert _versions(dep, "poison") == []
    # the worker serves the next job normally
    ok = dep.client.run(dep.client.enroll_job("acme", "after-poison", [dep.faces["obama"]], "k1"), timeout=180)
    assert ok.status == JobStatus.SUCCEEDED


# --- the task envelope and the bulk cursor, in-process against the session's Redis + SeaweedFS ---------------------
class _Retry(Exception):
    pass


class _FakeTask:
    """Stands in for the bound Celery task: records retries and continuations instead of publishing them."""

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.request = SimpleNamespace(retries=0)
        self.countdowns: list[float] = []
        self.continued: list[dict] = []

    def retry(self, exc: BaseException, countdown: float, max_retries: object = None) -> _Retry:
        self.countdowns.append(countdown)
        self.request.retries += 1
        return _Retry(str(exc))

    def apply_async(self, **kw: object) -> None:
        self.continued.append(kw)


def _bulk(rt, job, task, continuation: int):
    """One run of the bulk task's service function, sending through the tasks' Celery dispatch."""
    from worker.service import bulk
    from worker.service.clock import now
    from worker.tasks import control_tasks

    return bulk.bulk(rt, job, 1, now(), control_tasks.CeleryDispatch(task, job.job_id, rt.redis), continuation)


def _revoke(rt, job, task, continuation: int):
    """One run of the revoke task's service function, sending through the tasks' Celery dispatch."""
    from worker.service import revoke
    from worker.service.clock import now
    from worker.tasks import control_tasks

    return revoke.revoke(rt, job, 1, now(), control_tasks.CeleryDispatch(task, job.job_id, rt.redis), continuation)


@pytest.fixture
def rt(make_settings, redis_url: str, seaweed, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    """An in-process runtime on its own Redis database (flushed afterwards): the fan-out jobs these tests open and
    leave unfinished must not show up in other tests' progress metrics and alerts. Bulk manifests go to the default
    input bucket (``<bucket>-inputs``, see ``_put_input``)."""
    from worker.tasks import runtime

    seaweed.client().create_bucket(Bucket=f"{s3_bucket}-inputs")
    url = redis_url.rsplit("/", 1)[0] + "/3"
    r = runtime.WorkerRuntime(make_settings(bucket=s3_bucket, redis={"url": url}, worker={"max_attempts": 3}))
    monkeypatch.setattr(runtime, "_runtime", r)
    yield r
    r.redis.flushdb()


def _put_input(rt, key: str, body: bytes) -> str:
    """Put ``body`` under tenant acme's input prefix; returns its s3:// URI."""
    bucket, full = f"{rt.settings.s3.bucket}-inputs", f"tenants/acme/{key}"
    rt.store.client.put_object(Bucket=bucket, Key=full, Body=body)
    return f"s3://{bucket}/{full}"


def _envelope_task(handler, ident):
    """An enroll ``JobTask`` whose ``handle`` is ``handler(rt, job, attempt, started)``; like ``_FakeTask``, it records
    retries instead of publishing them."""
    from types import SimpleNamespace

    from worker.contracts import EnrollJob, EnrollResult
    from worker.tasks.envelope import JobTask

    class _Task(JobTask[EnrollJob, EnrollResult]):
        name = "t.envelope"
        job_model = EnrollJob
        result_model = EnrollResult
        job_type = "enroll"
        request = None  # shadows Celery's property: set per instance below

        def handle(self, rt_, job, attempt, started, delivery):
            return handler(rt_, job, attempt, started)

        def ident(self, job):
            return ident(job)

        def retry(self, exc: BaseException, countdown: float, max_retries: object = None) -> _Retry:
            self.countdowns.append(countdown)
            self.request.retries += 1
            return _Retry(str(exc))

    task = _Task()
    task.request = SimpleNamespace(retries=0, id=None)
    task.countdowns = []
    return task


def test_transient_errors_retry_with_backoff_then_dead_letter(rt) -> None:
    from worker_harness import job_id as new_id

    from worker.contracts import EnrollResult, to_wire
    from worker.errors import StorageError

    job = {
        "kind": "enroll",
        "job_id": new_id("tr"),
        "tenant": "acme",
        "subject": "s",
        "key_id": "k1",
        "images": ["s3://bkt/a.jpg"],
    }
    calls = []

    def flaky(rt_, j, attempt, started):
        calls.append(attempt)
        raise StorageError("s3://bkt/a.jpg: SlowDown (HTTP 503)")

    task = _envelope_task(flaky, lambda j: {"subject": j.subject, "key_id": j.key_id})
    for _ in range(8):  # far more than max_attempts (3): transient faults are retried for a time window
        with pytest.raises(_Retry):
            task.run(job)
    caps = [1, 2, 4, 8, 16, 30, 30, 30]  # exponential, capped at 30 s, jittered in [0.5, 1] x cap
    assert all(c / 2 <= d <= c for c, d in zip(caps, task.countdowns, strict=True)), task.countdowns
    assert calls == [1] * 8  # each clean transient failure gives its attempt back: attempts count crashes only
    rt.settings.worker.transient_retry_window = 0.0  # the window is over
    out = task.run(job)
    assert out["status"] == "dead_lettered" and calls == [1] * 9
    assert rt.book.get_dead_letter(f"acme/{job['job_id']}")["error_code"] == "storage_error"
    body, _ = rt.store.get(f"tenants/acme/dead-letters/{job['job_id']}.json")
    assert json.loads(body)["attempts"] == 1
    # the stored result answers any further delivery; the handler does not run again
    assert task.run(job) == out and calls == [1] * 9
    assert "SlowDown" not in json.dumps(to_wire(EnrollResult.model_validate(out)))  # message trimmed to the code


def test_bad_input_fails_once_without_retry(rt) -> None:
    from worker_harness import job_id as new_id

    from worker.errors import NoFaceError

    job = {
        "kind": "enroll",
        "job_id": new_id("nf"),
        "tenant": "acme",
        "subject": "s",
        "key_id": "k1",
        "images": ["s3://bkt/a.jpg"],
    }

    def no_face(rt_, j, attempt, started):
        raise NoFaceError("s3://bkt/a.jpg: no face found")

    task = _envelope_task(no_face, lambda j: {"subject": j.subject})
    out = task.run(job)
    assert out["status"] == "failed" and out["error"]["code"] == "no_face" and task.countdowns == []


def test_bulk_resumes_from_its_cursor(rt, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker_harness import job_id as new_id

    from worker.contracts import child_job_id, job_from_wire
    from worker.tasks import control_tasks

    lines = [
        json.dumps({"subject": f"s{i}", "images": [f"s3://{rt.settings.s3.bucket}/in/{i}.jpg"]}) for i in range(1, 6)
    ]
    lines.insert(2, '{"subject": "bad/one", "images": []}')  # line 3: a bad row is counted, the stream goes on
    uri = _put_input(rt, "manifests/m.jsonl", ("\n".join(lines) + "\n").encode())
    job = job_from_wire(
        {
            "kind": "bulk",
            "job_id": new_id("bk"),
            "tenant": "acme",
            "key_id": "k1",
            "chunk_size": 2,
            "manifest": {"format": "jsonl", "uri": uri},
        }
    )
    sent: list[str] = []
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw["task_id"]))
    monkeypatch.setattr(rt.settings.worker, "fanout_time_budget", 0.0)  # hand over after every chunk
    task = _FakeTask()

    r1 = _bulk(rt, job, task, 0)
    assert r1.status == "running" and rt.book.get_cursor(job.ref) == 2
    assert sent == [f"acme/{child_job_id(job.job_id, 'line', n)}" for n in (1, 2)]
    assert task.continued[-1]["kwargs"] == {"continuation": 1}
    # the continuation runs twice (a re-delivery): rows before the cursor are never sent again
    _bulk(rt, job, task, 1)
    assert rt.book.get_cursor(job.ref) == 4
    _bulk(rt, job, task, 1)
    _bulk(rt, job, task, 2)
    assert sent == [f"acme/{child_job_id(job.job_id, 'line', n)}" for n in (1, 2, 4, 5, 6)]
    p = rt.book.progress(job.ref)
    assert p.total == 6 and p.failed == 1 and p.failed_codes == {"malformed_job": 1}
    assert rt.book.get_fields(job.ref)["listing"] == "done"


def test_bulk_prefix_manifest_groups_objects_by_subject(rt, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker_harness import job_id as new_id

    from worker.contracts import job_from_wire
    from worker.tasks import control_tasks

    for key in ("in/p/alice/1.jpg", "in/p/alice/2.jpg", "in/p/bob/1.png", "in/p/readme.txt", "in/other/x.jpg"):
        _put_input(rt, key, b"x")
    b = f"{rt.settings.s3.bucket}-inputs"
    job = job_from_wire(
        {
            "kind": "bulk",
            "job_id": new_id("px"),
            "tenant": "acme",
            "key_id": "k1",
            "manifest": {"format": "prefix", "uri": f"s3://{b}/tenants/acme/in/p/"},
        }
    )
    sent: list[dict] = []
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw))
    res = _bulk(rt, job, _FakeTask(), 0)
    assert res.status == "running" and res.total == 2
    jobs = {kw["args"][0]["subject"]: kw["args"][0]["images"] for kw in sent}
    p = f"s3://{b}/tenants/acme/in/p"
    assert jobs == {"alice": [f"{p}/alice/1.jpg", f"{p}/alice/2.jpg"], "bob": [f"{p}/bob/1.png"]}
    assert all(kw["kwargs"] == {"parent": job.job_id} and kw["queue"] == "engine.bulk" for kw in sent)


def test_key_revocation_pauses_while_its_chunks_are_unfinished(rt, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backpressure: a revocation keeps at most 8 chunks unfinished on the engine queues. With nothing finishing it
    stops listing after the 9th chunk and re-queues itself after a pause; a continuation while still deep lists
    nothing; once chunks finish it goes on from its cursor, and every subject is sent exactly once."""
    from worker_harness import job_id as new_id

    from worker.contracts import job_from_wire
    from worker.keys.providers import write_keyring
    from worker.keys.registry import KeyRegistry
    from worker.service.revoke import REVOKE_PAUSE_S
    from worker.storage.records import CurrentPointer
    from worker.tasks import control_tasks

    write_keyring(rt.settings.keys.keyring_path, ["k1", "k2"])
    reg = KeyRegistry(rt.store)
    subjects = [f"s{i:02d}" for i in range(20)]
    for subject in subjects:
        reg.ensure_subject_key("acme", subject, "k1")
        rt.store.put_json(
            f"tenants/acme/subjects/{subject}/current.json", CurrentPointer(version=1, manifest_key="x", job_id="j")
        )
    job = job_from_wire(
        {"kind": "revoke", "job_id": new_id("rb"), "tenant": "acme", "key_id": "k1", "new_key_id": "k2", "reason": "r"}
    )
    sent: list[dict] = []
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw["args"][0]))
    monkeypatch.setattr(rt.settings.worker, "revoke_chunk_size", 1)
    window = rt.settings.worker.revoke_max_queued_chunks
    monkeypatch.setattr(rt.settings.worker, "fanout_time_budget", 3600.0)  # only backpressure hands over
    task = _FakeTask()
    _revoke(rt, job, task, 0)
    assert len(sent) == window + 1
    assert task.continued[-1]["countdown"] == REVOKE_PAUSE_S and task.continued[-1]["kwargs"] == {"continuation": 1}
    _revoke(rt, job, task, 1)  # nothing finished meanwhile: still paused, nothing more listed
    assert len(sent) == window + 1 and task.continued[-1]["kwargs"] == {"continuation": 2}
    rt.book.mark_succeeded(job.ref, [c["subjects"][0] for c in sent[:5]])  # five chunks done
    _revoke(rt, job, task, 2)
    assert len(sent) == window + 1 + 5
    rt.book.mark_succeeded(job.ref, [c["subjects"][0] for c in sent])
    _revoke(rt, job, task, 3)
    assert sorted(c["subjects"][0] for c in sent) == subjects  # each once, none skipped
    assert rt.book.get_fields(job.ref)["listing"] == "done"


def test_key_revocation_listing_hands_over_and_resumes_from_its_cursor(rt, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key with many subjects is listed across continuations: each picks up after the last subject listed (never
    from the start), subjects under other keys are skipped, a subject never committed is fenced (not reissued), and
    every chunk is sent once."""
    from worker_harness import job_id as new_id

    from worker.contracts import job_from_wire
    from worker.keys.providers import write_keyring
    from worker.keys.registry import KeyRegistry
    from worker.storage.records import CurrentPointer
    from worker.tasks import control_tasks

    write_keyring(rt.settings.keys.keyring_path, ["k1", "k2"])
    reg = KeyRegistry(rt.store)
    under = [f"s{i:02d}" for i in range(7)]
    for subject in [*under, "other-key", "never-committed"]:
        reg.ensure_subject_key("acme", subject, "k9" if subject == "other-key" else "k1")
        if subject != "never-committed":
            rt.store.put_json(
                f"tenants/acme/subjects/{subject}/current.json",
                CurrentPointer(version=1, manifest_key="x", job_id="j"),
            )
    job = job_from_wire(
        {"kind": "revoke", "job_id": new_id("rk"), "tenant": "acme", "key_id": "k1", "new_key_id": "k2", "reason": "r"}
    )
    sent: list[dict] = []
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw["args"][0]))
    monkeypatch.setattr(rt.settings.worker, "revoke_chunk_size", 3)
    monkeypatch.setattr(rt.settings.worker, "fanout_time_budget", 0.0)  # hand over after every chunk
    task = _FakeTask()
    r = _revoke(rt, job, task, 0)
    assert r.status == "running" and task.continued[-1]["kwargs"] == {"continuation": 1}
    assert [c["subjects"] for c in sent] == [under[:3]]
    _revoke(rt, job, task, 1)
    _revoke(rt, job, task, 2)
    assert [c["subjects"] for c in sent] == [under[:3], under[3:6], under[6:]]
    assert len(task.continued) == 2  # the last one finished the listing instead of handing over
    fields = rt.book.get_fields(job.ref)
    assert fields["listing"] == "done" and rt.book.progress(job.ref).total == 7
    assert fields["subjects_fenced"] == "1"  # "never-committed": moved to k2 and fenced, nothing to reissue
    assert reg.is_revoked("acme", "k1") and not reg.is_revoked("beta", "k1")


def test_tasks_retry_without_celerys_default_limit(make_settings) -> None:
    """Celery's default ``max_retries`` (3) would fail a task on its 4th transient fault without storing a result;
    the app's tasks leave the limit to the envelope's time window (JobTask.run_job)."""
    from worker.broker.config import make_celery

    app = make_celery(make_settings())

    @app.task(name="t.probe", bind=True)
    def probe(self):
        return None

    assert probe.max_retries is None
    assert probe.Strategy == "worker.tasks.transport:guarded_strategy"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_oversize_manifest_rows_fail_alone(rt, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """A field over the csv module's 131,072-character limit, or a line of megabytes, fails its own row
    (``malformed_job``); the rows around it are queued."""
    from worker_harness import job_id as new_id

    from worker.contracts import child_job_id, job_from_wire
    from worker.tasks import control_tasks

    huge = "x" * 200_000
    if fmt == "csv":
        body = f"subject,image\na,s3://inputs/a.jpg\nb,s3://inputs/{huge}.jpg\nc,s3://inputs/c.jpg\n"
    else:
        body = (
            "\n".join(
                [
                    '{"subject": "a", "images": ["s3://inputs/a.jpg"]}',
                    '{"subject": "b", "images": ["s3://inputs/' + huge * 5 + '.jpg"]}',  # a 1 MB line
                    '{"subject": "c", "images": ["s3://inputs/c.jpg"]}',
                ]
            )
            + "\n"
        )
    uri = _put_input(rt, f"manifests/m.{fmt}", body.encode())
    job = job_from_wire(
        {
            "kind": "bulk",
            "job_id": new_id("big"),
            "tenant": "acme",
            "key_id": "k1",
            "chunk_size": 10,
            "manifest": {"format": fmt, "uri": uri},
        }
    )
    sent: list[str] = []
    monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw["task_id"]))
    _bulk(rt, job, _FakeTask(), 0)
    first, last = (2, 4) if fmt == "csv" else (1, 3)
    assert sent == [f"acme/{child_job_id(job.job_id, 'line', n)}" for n in (first, last)]
    p = rt.book.progress(job.ref)
    assert p.total == 3 and p.failed == 1 and p.failed_codes == {"malformed_job": 1}


def test_reconcile_counts_missed_bulk_children_and_syncs_dead_letters(rt) -> None:
    """The beat task repairs what a Redis outage can leave behind: children whose results are stored but whose
    report to the bulk parent was lost, and dead letters that never reached S3."""
    from worker_harness import job_id as new_id

    from worker.contracts import EnrollResult, JobStatus, child_job_id, to_wire
    from worker.tasks import control_tasks

    book = rt.book
    parent = new_id("bk")
    pref = f"acme/{parent}"  # the job book keys jobs by tenant/job_id
    book.open_job(pref, "bulk", tenant="acme", attempts=1)
    children = [child_job_id(parent, "line", n) for n in (1, 2, 3)]
    for cid in children:
        res = EnrollResult(job_id=cid, tenant="acme", subject=cid[-8:], status=JobStatus.SUCCEEDED, version=1)
        book.save_result(f"acme/{cid}", to_wire(res))
    book.mark_succeeded(pref, children[:1])  # the reports of children 2 and 3 were lost
    book.set_total(pref, 3)
    book.set_fields(pref, listing="done")
    dl = new_id("dl")
    book.add_dead_letter(
        f"acme/{dl}",
        {
            "job_id": dl,
            "job_kind": "enroll",
            "tenant": "acme",
            "attempts": 3,
            "error_code": "storage_error",
            "message": "",
            "job": {},
            "s3_uri": None,
        },
    )

    assert book.get_result(pref) is None
    out = control_tasks.reconcile(idle_s=0.0)
    assert out == {"dead_letters_synced": 1, "bulk_children_repaired": 2}
    final = book.get_result(pref)
    assert final is not None and final["status"] == "succeeded" and final["succeeded"] == 3
    assert rt.store.exists(f"tenants/acme/dead-letters/{dl}.json")
    assert book.get_dead_letter(f"acme/{dl}")["s3_uri"].endswith(f"{dl}.json")
    assert control_tasks.reconcile(idle_s=0.0) == {"dead_letters_synced": 0, "bulk_children_repaired": 0}
