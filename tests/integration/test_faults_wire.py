"""What reaches a worker through Redis and S3 cannot reach another tenant's jobs or take the worker down
(docs/reliability.md): job IDs are scoped by tenant, compressed bodies are refused before decompression, every
refused message whose job can be read leaves a stored result and a dead letter under that job, and a permanent S3
answer fails a job at once instead of being retried as transient. Real Redis, SeaweedFS and Celery worker processes.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import json
import os
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
from test_producers_cli import cli
from worker_harness import Deployment, job_id, running

from worker.contracts import JobStatus
from worker.errors import MalformedJobError

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RSS_LIMIT_MB = 300


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def _raw_message(
    task: str,
    task_id: str,
    body: bytes,
    queue: str,
    *,
    content_type: str = "application/json",
    headers: dict[str, Any] | None = None,
) -> bytes:
    """A kombu/Celery protocol-2 envelope as the Redis transport stores it (body base64-encoded)."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "binary" if content_type != "application/json" else "utf-8",
            "content-type": content_type,
            "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0, **(headers or {})},
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


def _enroll_body(dep: Deployment, jid: str, tenant: str = "acme") -> bytes:
    job = {
        "kind": "enroll",
        "schema_version": 1,
        "job_id": jid,
        "tenant": tenant,
        "subject": "someone",
        "images": [dep.faces["obama"]],
        "key_id": "k1",
    }
    return json.dumps([[job], {}, {}]).encode()


def _refused(dep: Deployment, ref: str, timeout: float = 90.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stored result and the Redis dead letter of a refused message's job ``ref`` (both must appear)."""
    res = dep.client.wait(ref, timeout=timeout)
    deadline = time.monotonic() + 10
    while (dl := dep.client.book.get_dead_letter(ref)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dl is not None, (ref, dep.worker.tail())
    return res, dl


def _tree_rss_mb(pids: list[int]) -> float:
    """Resident memory of the worker's processes (main process and prefork pool), in MB."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


class _RssSampler(threading.Thread):
    """Samples the processes' summed RSS every 20 ms until stopped; ``peak`` is the largest sample."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self._stop_at = pids, 0.0, threading.Event()

    def run(self) -> None:
        while not self._stop_at.is_set():
            self.peak = max(self.peak, _tree_rss_mb(self.pids))
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop_at.set()
        self.join(5)
        return self.peak


# --- job IDs are per tenant -------------------------------------------------------------------------------------------
def test_a_job_id_colliding_with_another_tenants_finished_job_is_a_different_job(dep: Deployment) -> None:
    c = dep.client
    shared = job_id("same")
    acme = c.run(c.enroll_job("acme", "alice", [dep.faces["obama"]], "k1", job_id=shared), timeout=300)
    assert acme.status == JobStatus.SUCCEEDED and acme.tenant == "acme", acme
    beta_face = dep.upload_input(
        "beta", "obama.jpg", dep.s3.get_object(Bucket=dep.input_bucket, Key="tenants/acme/obama.jpg")["Body"].read()
    )

    # beta's enrolment under acme's finished job ID: its own job, run and stored under beta
    ref = c.submit(c.enroll_job("beta", "bob", [beta_face], "k1", job_id=shared))
    assert ref == f"beta/{shared}"
    beta = c.wait(ref, timeout=300)
    assert beta.status == JobStatus.SUCCEEDED and beta.tenant == "beta" and beta.subject == "bob", beta
    assert beta.version == 1 and beta.attempts == 1 and beta.created is True
    assert beta.manifest_uri.startswith(f"s3://{dep.bucket}/tenants/beta/subjects/bob/")
    state = c.subject("beta", "bob")
    assert state is not None and state.current_version == 1
    # acme's record is untouched, and nothing of beta's job is under acme
    assert c.result(f"acme/{shared}") == acme
    assert c.subject("acme", "bob") is None and c.subject("beta", "alice") is None
    # a verify by beta under acme's job ID again: beta's own answer, not acme's stored enrolment
    v = c.run(c.verify_job("beta", "alice", beta_face, job_id=shared + "-v"), timeout=300)
    assert v.status == JobStatus.FAILED and v.error.code == "no_template" and v.tenant == "beta", v

    # status lookups are per tenant; a bare job ID names no job
    assert c.status(f"acme/{shared}")["result"]["subject"] == "alice"
    assert c.status(f"beta/{shared}")["result"]["subject"] == "bob"
    with pytest.raises(MalformedJobError):
        c.result(shared)
    assert c.redis.get(f"cf:result:{shared}") is None and c.redis.get(f"cf:attempts:{shared}") is None
    r = cli(["status", shared, "--tenant", "beta", "--json"], dep.env)
    assert r.returncode == 0 and json.loads(r.stdout)["result"]["tenant"] == "beta", (r.stdout, r.stderr)
    r = cli(["status", f"acme/{shared}", "--json"], dep.env)
    assert r.returncode == 0 and json.loads(r.stdout)["result"]["tenant"] == "acme", (r.stdout, r.stderr)
    r = cli(["status", shared], dep.env)
    assert r.returncode == 2 and "TENANT/JOB_ID" in r.stderr, (r.stdout, r.stderr)


# --- compressed bodies ------------------------------------------------------------------------------------------------
def test_a_compression_bomb_is_refused_before_decompression_and_dead_lettered(dep: Deployment) -> None:
    import redis

    r = redis.Redis.from_url(dep.settings.redis.url.get_secret_value())
    c = dep.client
    assert c.ping(timeout=60) and c.ping(timeout=60, engine=True)  # warm and idle
    pid = dep.worker.popen.pid
    pool = dep.worker.children()
    idle = 0.0
    for _ in range(5):
        idle = max(idle, _tree_rss_mb([pid, *pool]))
        time.sleep(0.1)

    # 1 GiB of zeros in about 1.3 KB: bz2 streams decompress as their concatenation
    bomb = bz2.compress(b"\0" * (64 << 20), 9) * 16
    assert len(bomb) < 4096
    bomb_ref = f"acme/{job_id('bomb')}"
    # a compressed body that holds a valid job is refused all the same: producers never compress
    plain = _enroll_body(dep, job_id("zlib"))
    zipped_ref = f"acme/{json.loads(plain)[0][0]['job_id']}"

    sampler = _RssSampler([pid, *pool])
    sampler.start()
    try:
        r.lpush(
            "engine",
            _raw_message("cancelable.enroll", bomb_ref, bomb, "engine", headers={"compression": "application/x-bz2"}),
        )
        bomb_res, bomb_dl = _refused(dep, bomb_ref)
        time.sleep(1.0)
    finally:
        peak = sampler.stop()
    print(f"worker RSS idle {idle:.0f} MB, peak {peak:.0f} MB while refusing the bomb")
    assert peak - idle < RSS_LIMIT_MB, (idle, peak)

    r.lpush(
        "engine",
        _raw_message(
            "cancelable.enroll",
            zipped_ref,
            zlib.compress(plain),
            "engine",
            headers={"compression": "application/x-gzip"},
        ),
    )
    zipped_res, zipped_dl = _refused(dep, zipped_ref)
    for res, dl, raw in ((bomb_res, bomb_dl, bomb), (zipped_res, zipped_dl, zlib.compress(plain))):
        assert res["status"] == "failed" and res["error"]["code"] == "malformed_job" and res["tenant"] == "acme"
        assert "compressed body refused" in res["error"]["message"]
        assert dl["error_code"] == "malformed_job" and dl["tenant"] == "acme" and dl["job_kind"] == "unknown"
        assert dl["raw_size"] > len(raw)  # the whole list item (envelope), hashed as received, never decompressed
    assert dep.worker.alive() and dep.worker.popen.pid == pid, dep.worker.tail()
    assert r.llen("engine") == 0
    assert c.subject("acme", "someone") is None  # the compressed job never ran
    good = c.run(c.verify_job("acme", "nobody", dep.faces["obama"]), timeout=300)
    assert good.status == JobStatus.FAILED and good.error.code == "no_template"


# --- every poison form leaves a trace the producer can read -----------------------------------------------------------
def test_unknown_task_pickle_and_yaml_messages_leave_a_result_and_a_dead_letter(
    dep: Deployment, tmp_path: Path
) -> None:
    import redis

    r = redis.Redis.from_url(dep.settings.redis.url.get_secret_value())
    c = dep.client
    pid = dep.worker.popen.pid
    marker = tmp_path / "unpickled"
    # would run a shell command if anything unpickled it
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."

    body_id = job_id("unk-body")  # a plain task ID: the job is read from the JSON body (tenant + job ID)
    refs = {
        "unknown-task-body": f"acme/{body_id}",
        "unknown-task-id": f"acme/{job_id('unk-id')}",
        "pickle": f"acme/{job_id('pickle')}",
        "yaml": f"beta/{job_id('yaml')}",
    }
    messages = {
        "unknown-task-body": ("engine", _raw_message("cancelable.nope", body_id, _enroll_body(dep, body_id), "engine")),
        "unknown-task-id": (
            "control",
            _raw_message("no.such.task", refs["unknown-task-id"], b"[[], {}, {}]", "control"),
        ),
        "pickle": (
            "engine",
            _raw_message(
                "cancelable.enroll", refs["pickle"], evil, "engine", content_type="application/x-python-serialize"
            ),
        ),
        "yaml": (
            "engine",
            _raw_message(
                "cancelable.verify",
                refs["yaml"],
                b"- [{kind: verify}]\n- {}\n- {}\n",
                "engine",
                content_type="application/x-yaml",
            ),
        ),
    }
    for queue, raw in messages.values():
        r.lpush(queue, raw)
    for name, ref in refs.items():
        res, dl = _refused(dep, ref)
        tenant, jid = ref.split("/")
        assert res["status"] == "failed" and res["error"]["code"] == "malformed_job", (name, res)
        assert res["tenant"] == tenant and res["job_id"] == jid, (name, res)
        assert dl["error_code"] == "malformed_job" and dl["tenant"] == tenant and dl["job_id"] == jid, (name, dl)
        assert len(dl["raw_sha256"]) == 64 and dl["raw_size"] > 0
    assert "unknown task name" in c.result(refs["unknown-task-id"])["error"]["message"]
    assert "content type refused" in c.result(refs["pickle"])["error"]["message"]
    assert not marker.exists()  # never unpickled
    assert c.subject("acme", "someone") is None
    # an existing result is never replaced by a refused message naming the same job
    done = c.run(c.verify_job("acme", "nobody", dep.faces["obama"]), timeout=300)
    r.lpush("engine", _raw_message("cancelable.nope", f"acme/{done.job_id}", b"x", "engine"))
    assert c.ping(timeout=60)
    time.sleep(1.0)
    assert c.result(f"acme/{done.job_id}") == done
    assert dep.worker.alive() and dep.worker.popen.pid == pid, dep.worker.tail()
    log = dep.worker.log.read_text()
    assert "cos\nsystem" not in log and hashlib.sha256(evil).hexdigest()[:16] in log


# --- S3 errors ------------------------------------------------------------------------------------------------------
def test_an_s3_400_on_an_input_fails_at_once_with_a_permanent_code(dep: Deployment) -> None:
    c = dep.client
    photo = dep.s3.get_object(Bucket=dep.input_bucket, Key="tenants/acme/obama.jpg")["Body"].read()
    # an object stored with a customer-provided key: SeaweedFS answers a plain GET with 400 InvalidArgument
    dep.s3.put_object(
        Bucket=dep.input_bucket,
        Key="tenants/acme/sealed.jpg",
        Body=photo,
        SSECustomerAlgorithm="AES256",
        SSECustomerKey=os.urandom(32),
    )
    job = c.enroll_job("acme", "sealed", [f"s3://{dep.input_bucket}/tenants/acme/sealed.jpg"], "k1")
    t0 = time.monotonic()
    res = c.run(job, timeout=120)  # the transient retry window is 300 s: a retried job would time out here
    took = time.monotonic() - t0
    assert res.status == JobStatus.FAILED and res.error.code == "invalid_input", res
    assert not res.error.retryable and res.attempts == 1 and "HTTP 400" in res.error.message
    assert took < 60, took
    assert c.redis.get(f"cf:transient:{job.ref}") is None  # never counted as a transient fault
    assert c.book.attempts(job.ref) == 1 and c.book.get_dead_letter(job.ref) is None
    assert f"{job.job_id} transient" not in dep.worker.log.read_text()
    assert c.subject("acme", "sealed") is None
    # a backslash key (SeaweedFS reads it as '/', so '..\\' climbs out of the prefix) never reaches S3
    with pytest.raises(MalformedJobError, match="backslash"):
        c.enroll_job("acme", "x", [f"s3://{dep.input_bucket}/tenants/acme/..\\beta\\obama.jpg"], "k1")
