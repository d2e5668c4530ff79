"""Cross-job micro-batching on a real engine worker (``--pool threads``, ``worker/tasks/batcher.py``): several enrol
and verify jobs sent at once run in shared engine batches (the batch-size metric shows batches of more than one
image) and each still gets its own result and version; a job whose image is bad fails alone; a batch that runs past
the hard time limit makes the watchdog exit the worker, and every job of the batch completes exactly once after the
restart, through the visibility timeout."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports
from worker_harness import Deployment, deploy, running

from worker.contracts import JobStatus

pytestmark = pytest.mark.integration

THREADS = 8


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    (port,) = free_ports(1)
    yield from running(
        service_env,
        seaweed,
        tmp_path,
        pool="threads",
        concurrency=THREADS,
        CANCELABLE_METRICS__ENABLED="true",
        CANCELABLE_METRICS__HOST="127.0.0.1",
        CANCELABLE_METRICS__PORT=str(port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
        # long enough that on a loaded CI box the jobs sent together meet in one batch; a batch still starts as
        # soon as no job in flight is still preparing work for its lane
        CANCELABLE_ENGINE__BATCH_FILL_TIMEOUT_MS="3000",
    )


def _batch_histogram(dep: Deployment, job_type: str) -> dict[str, float]:
    """``le`` bucket -> cumulative count of ``cancelable_batch_size_images`` for ``job_type``, plus sum and count."""
    from prometheus_client.parser import text_string_to_metric_families

    port = dep.env["CANCELABLE_METRICS__PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "cancelable_batch_size_images":
            continue
        for s in fam.samples:
            if s.labels.get("job_type") != job_type:
                continue
            key = s.labels["le"] if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[-1]
            out[key] = s.value
    return out


def _source_uris(dep: Deployment, manifest_uri: str) -> list[str]:
    bucket, key = manifest_uri[5:].split("/", 1)
    man = json.loads(dep.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return [s["uri"] for s in man["source_images"]]


def test_jobs_sent_together_share_engine_batches_and_keep_their_own_results(dep: Deployment) -> None:
    f = dep.faces
    photos = [f["obama"], f["obama2"], f["obama3"], f["biden"], f["obama"], f["biden"]]
    corrupt = dep.upload_input("acme", "corrupt.jpg", b"\xff\xd8\xff\xe0 not a jpeg at all")
    jobs = [dep.client.enroll_job("acme", f"b{i}", [p], "k1") for i, p in enumerate(photos)]
    broken = dep.client.enroll_job("acme", "broken", [corrupt], "k1")
    dep.client.submit_many([*jobs[:3], broken, *jobs[3:]])
    results = [dep.client.wait(j.ref, timeout=300) for j in jobs]
    bad = dep.client.wait(broken.ref, timeout=60)

    assert bad.status == JobStatus.FAILED and bad.error.code.value == "invalid_image", bad
    for i, (job, res) in enumerate(zip(jobs, results, strict=True)):
        assert res.status == JobStatus.SUCCEEDED, (i, res)
        assert res.job_id == job.job_id and res.subject == f"b{i}" and res.version == 1 and res.attempts == 1
        assert _source_uris(dep, res.manifest_uri) == [photos[i]]  # its own image, not a batch mate's
    assert len({r.template_uri for r in results}) == len(jobs)

    h = _batch_histogram(dep, "enroll")
    assert h["sum"] == len(jobs)  # every image of every good job went through exactly one engine call
    assert h["count"] < len(jobs), f"every enrolment ran in a batch of its own: {h}"
    assert h["1.0"] < h["count"], f"no engine batch held more than one image: {h}"

    # probes of several subjects at once: batched too, each scored against its own subject's template
    probes = [dep.client.verify_job("acme", f"b{i}", photos[i]) for i in range(4)]
    dep.client.submit_many(probes)
    verdicts = [dep.client.wait(p.ref, timeout=300) for p in probes]
    for i, v in enumerate(verdicts):
        assert v.status == JobStatus.SUCCEEDED and v.subject == f"b{i}" and v.version == 1, v
        assert -1.0 <= v.score <= 1.0
    hv = _batch_histogram(dep, "verify")
    assert hv["sum"] == len(probes) and hv["count"] < len(probes), hv


VT = 20  # visibility timeout of the watchdog test (s)


def test_a_batch_past_the_hard_limit_exits_the_worker_and_every_job_completes_once(
    service_env, seaweed, tmp_path: Path
) -> None:
    dep = deploy(
        service_env,
        seaweed,
        tmp_path,
        pool="threads",
        concurrency=4,
        CANCELABLE_ENGINE__STEPS="3000",  # far longer than the 3 s hard limit below
        CANCELABLE_ENGINE__BATCH_FILL_TIMEOUT_MS="3000",
        CANCELABLE_WORKER__TASK_TIME_LIMIT="3",
        CANCELABLE_WORKER__VISIBILITY_TIMEOUT=str(VT),
    )
    try:
        f = dep.faces
        jobs = [dep.client.enroll_job("acme", f"w{i}", [p], "k1") for i, p in enumerate([f["obama"], f["biden"]])]
        t0 = time.monotonic()
        dep.client.submit_many(jobs)
        dep.worker.popen.wait(120)  # the watchdog ends the process (no signal from the test)
        assert dep.worker.popen.returncode == 70, dep.worker.tail()
        assert "longer than the hard time limit" in dep.worker.tail(200)
        assert all(dep.client.result(j.ref) is None for j in jobs)
        dep.restart(CANCELABLE_ENGINE__STEPS="5", CANCELABLE_WORKER__TASK_TIME_LIMIT="15")
        results = [dep.client.wait(j.ref, timeout=VT + 180) for j in jobs]
        waited = time.monotonic() - t0
        for i, res in enumerate(results):
            assert res.status == JobStatus.SUCCEEDED, res
            # the first delivery was counted, the second ran (alone) and committed the only version
            assert res.attempts == 2 and res.version == 1 and res.subject == f"w{i}"
            listed = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix=f"tenants/acme/subjects/w{i}/versions/")
            assert [o["Key"].rsplit("/", 1)[-1] for o in listed["Contents"]] == ["0000000001.json"]
        assert waited >= VT - 4  # re-delivered through the visibility timeout, not re-published
    finally:
        dep.worker.stop()
        dep.client.close()
