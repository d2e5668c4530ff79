"""``Client.submit_many``: the raw Redis list items it pushes are the ones ``Client.submit`` pushes (delivery tag and
``sent_at`` aside), the submit markers are written, and a real worker runs jobs queued that way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_harness import Deployment, job_id, running

from worker.contracts import JobStatus

pytestmark = pytest.mark.integration

QUEUES = ("engine.interactive", "engine.bulk", "control")


def _drain(r) -> dict[str, list[dict]]:
    """Every item on the queues, oldest first, decoded; the queues are emptied."""
    out = {}
    for q in QUEUES:
        raw = r.lrange(q, 0, -1)
        r.delete(q)
        out[q] = [json.loads(x) for x in reversed(raw)]
    return out


def _comparable(item: dict) -> dict:
    item = json.loads(json.dumps(item))
    assert isinstance(item["headers"].pop("sent_at"), float)
    assert item["properties"].pop("delivery_tag")
    return item


def test_submit_many_pushes_what_submit_pushes(make_settings) -> None:
    from producers.client import Client

    client = Client(make_settings())
    try:
        r = client.redis
        jobs = [
            client.enroll_job("acme", "ann", ["s3://bkt/in/a.jpg", "s3://bkt/in/b.jpg"], "k1", job_id=job_id("e1")),
            client.enroll_job("acme", "bob", ["s3://bkt/in/c.jpg"], "k1", job_id=job_id("e2")),
            client.verify_job("acme", "ann", "s3://bkt/in/d.jpg", threshold=0.4, job_id=job_id("v1")),
            client.revoke_job("acme", "leak", key_id="k1", new_key_id="k2", job_id=job_id("r1")),
            client.enroll_job("acme", "cy", ["s3://bkt/in/e.jpg"], "k1", job_id=job_id("e3")),
        ]
        _drain(r)
        for j in jobs:
            client.submit(j)
        one_by_one = _drain(r)
        for j in jobs:
            r.delete(f"cf:submitted:{j.ref}")
        ids = client.submit_many(jobs, batch=2)  # several batches, kinds mixed within a batch
        many = _drain(r)
        assert ids == [j.ref for j in jobs]  # tenant/job_id: the Celery task IDs too
        assert [len(many[q]) for q in QUEUES] == [4, 0, 1]
        for q in QUEUES:
            assert [_comparable(x) for x in many[q]] == [_comparable(x) for x in one_by_one[q]]
        # back-office batches go behind interactive work; revoke and bulk stay on the control queue
        for j in jobs:
            r.delete(f"cf:submitted:{j.ref}")
        client.submit_many(jobs, batch=2, background=True)
        bg = _drain(r)
        assert [len(bg[q]) for q in QUEUES] == [0, 4, 1]
        assert [x["headers"]["id"] for x in bg["engine.bulk"]] == [
            x["headers"]["id"] for x in many["engine.interactive"]
        ]
        assert all(client.book.submitted_at(j.ref) is not None for j in jobs)
        assert all(client.status(j.ref)["state"] == "queued" for j in jobs)
        # the whole job is in the body, not repeated in Celery's argsrepr header
        assert many["engine.interactive"][0]["headers"]["argsrepr"] == f"[<enroll job {jobs[0].job_id}>]"
    finally:
        client.close()


def test_submit_many_refuses_a_malformed_batch_before_queueing_it(make_settings) -> None:
    from producers.client import Client
    from worker.errors import MalformedJobError

    client = Client(make_settings())
    try:
        _drain(client.redis)
        good = client.enroll_job("acme", "ann", ["s3://bkt/in/a.jpg"], "k1", job_id=job_id("g"))
        bad = {**good.model_dump(mode="json"), "job_id": job_id("b"), "subject": "no/slash"}
        with pytest.raises(MalformedJobError):
            client.submit_many([good, bad], batch=10)
        assert client.redis.llen("engine.interactive") == 0 and client.book.submitted_at(good.ref) is None
    finally:
        client.close()


def test_a_malformed_job_late_in_a_batch_queues_nothing_of_that_batch(make_settings) -> None:
    """Jobs are validated and rendered a few at a time, but a batch is sent only once all of it is valid."""
    from producers.client import Client
    from worker.errors import MalformedJobError

    client = Client(make_settings())
    try:
        _drain(client.redis)
        jobs = [
            {
                "kind": "enroll",
                "job_id": job_id(f"late{i}"),
                "tenant": "acme",
                "subject": f"s{i}",
                "images": [f"s3://bkt/in/{i}.jpg"],
                "key_id": "k1",
            }
            for i in range(150)
        ]
        bad = {**jobs[0], "job_id": job_id("late-bad"), "subject": "no/slash"}
        with pytest.raises(MalformedJobError, match="subject"):
            client.submit_many([*jobs[:140], bad, *jobs[140:]], batch=100)  # the bad job is the 41st of batch 2
        queued = _drain(client.redis)["engine.interactive"]
        assert [x["headers"]["id"] for x in queued] == [f"acme/{j['job_id']}" for j in jobs[:100]]
        assert client.book.submitted_at(f"acme/{jobs[99]['job_id']}") is not None
        assert all(client.book.submitted_at(f"acme/{j['job_id']}") is None for j in jobs[100:])
    finally:
        client.close()


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def test_a_worker_runs_jobs_queued_by_submit_many(dep: Deployment) -> None:
    f = dep.faces
    jobs = [
        dep.client.enroll_job("acme", "many1", [f["obama"]], "k1"),
        dep.client.enroll_job("acme", "many2", [f["obama2"]], "k1"),
    ]
    ids = dep.client.submit_many(jobs)
    for i in ids:
        res = dep.client.wait(i, timeout=180)
        assert res.status == JobStatus.SUCCEEDED and res.version == 1, res
    v = dep.client.submit_many([dep.client.verify_job("acme", "many1", f["obama3"])])
    assert dep.client.wait(v[0], timeout=180).status == JobStatus.SUCCEEDED
