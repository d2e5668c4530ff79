"""Poison messages pushed straight into the broker's Redis lists never stop a worker (docs/reliability.md).

Every malformed form found in the review: non-JSON bytes, a JSON value that is not an envelope, an envelope without
properties, an envelope whose task body is a string, bad base64, a task whose job argument is not a job. After all of
them the same worker process serves the next good job; each is dead-lettered by hash and size; those whose task ID
is a job reference (``tenant/job_id``, what producers send) get a stored ``malformed_job`` result.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest
from worker_harness import Deployment, job_id, running

from worker.contracts import JobStatus

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def _envelope(task: str, task_id: str, body: bytes, queue: str, *, encode: bool = True) -> bytes:
    """A kombu/Celery protocol-2 envelope as the Redis transport stores it."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode() if encode else body.decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0},
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def test_poison_messages_never_stop_the_worker(dep: Deployment) -> None:
    import redis

    r = redis.Redis.from_url(dep.settings.redis.url.get_secret_value())
    c = dep.client
    # task IDs are job references (tenant/job_id), as producers send them
    ids = {name: f"acme/{job_id(name)}" for name in ("string-body", "bad-job", "short-body", "bad-base64")}
    poison: dict[str, tuple[str, bytes]] = {
        "not-json": ("engine", b"\x00\xffthis is not json{"),
        "json-string": ("engine", b'"just a string"'),
        "json-list": ("control", b"[1, 2, 3]"),
        "no-properties": ("engine", b'{"body": "eA==", "headers": {}}'),
        "string-body": ("engine", _envelope("cancelable.enroll", ids["string-body"], b'"a string body"', "engine")),
        "short-body": ("control", _envelope("cancelable.revoke", ids["short-body"], b"[[], {}]", "control")),
        "bad-base64": (
            "engine",
            _envelope("cancelable.enroll", ids["bad-base64"], b"%%%not base64", "engine", encode=False),
        ),
        "bad-job": (
            "engine",
            _envelope("cancelable.enroll", ids["bad-job"], json.dumps([["not a job"], {}, {}]).encode(), "engine"),
        ),
    }
    pid = dep.worker.popen.pid
    for _name, (queue, raw) in poison.items():
        r.lpush(queue, raw)
    # the worker keeps serving: a good job on each queue completes after the poison
    good = c.wait(c.submit(c.verify_job("acme", "nobody", dep.faces["obama"])), timeout=300)
    assert good.status == JobStatus.FAILED and good.error.code == "no_template", good
    assert c.ping(timeout=60)["pid"]
    deadline = time.monotonic() + 60
    while any(r.llen(q) for q in ("engine", "control")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dep.worker.alive() and dep.worker.popen.pid == pid, dep.worker.tail()
    assert r.llen("engine") == 0 and r.llen("control") == 0  # nothing put back for a later restart to choke on

    dead = {
        json.loads(r.get(f"cf:deadletter:{i.decode()}")).get("raw_sha256") for i in r.lrange("cf:deadletter", 0, -1)
    }
    for name in ("not-json", "json-string", "json-list", "no-properties"):
        as_received = poison[name][1].decode("utf-8", errors="replace").encode()  # kombu decodes before we see it
        assert hashlib.sha256(as_received).hexdigest() in dead, name
    log = dep.worker.log.read_text()
    assert "poison message dead-lettered" in log and "malformed task message refused" in log
    assert "a string body" not in log and "this is not json" not in log  # hashes and sizes only, never the bytes
    # producers waiting on a task ID get an answer
    for name in ("string-body", "short-body", "bad-job"):
        res = c.wait(ids[name], timeout=60)
        assert isinstance(res, dict) and res["status"] == "failed" and res["error"]["code"] == "malformed_job", name
    # and after a restart nothing poisonous is redelivered: the worker comes up and serves
    dep.restart()
    again = c.wait(c.submit(c.verify_job("acme", "nobody", dep.faces["obama"])), timeout=300)
    assert again.status == JobStatus.FAILED and again.error.code == "no_template"
