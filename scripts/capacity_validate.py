"""``scripts/capacity.py validate``: a real small run on this machine against the capacity model (see capacity.py).

Order: services up; photos uploaded; the engine's images/s in-process (batches of 8); calibration in-process
(S3 requests of one enrolment and one re-enrolment counted on the boto3 client's ``before-call`` events, the serial
per-subject cost of a re-enrolment chunk before and after its engine call, Redis bytes per queued message); then an
engine worker (threads pool, 16 task threads) and a control worker, a bulk enrolment of ``--subjects`` one-photo
subjects and a key revocation of them, each timed from submit to its final result; the images/s in-process again;
predicted (from the measured rates) vs measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_system as bs  # noqa: E402
from capacity import ENROLL_S3, REENROLL_S3, Fleet, Job, describe, predict  # noqa: E402

from worker.service.bulk import BULK_MAX_QUEUE_DEPTH_CHUNKS, BULK_PAUSE_S  # noqa: E402

INPUTS = "bench-inputs"
SCAN_LIST_PER_S = 200.0  # the record-scan listing on this machine (bench_system.py): these subjects have no index


class S3Counter:
    """Counts S3 API calls by operation on one boto3 client (its ``before-call`` event: one per call, retries not
    counted twice)."""

    def __init__(self, client: Any) -> None:
        self.counts: Counter[str] = Counter()
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.counts[model.name] += 1

    def snapshot(self) -> Counter[str]:
        return Counter(self.counts)


class Sampler(threading.Thread):
    """Every 0.1 s: the bulk engine queue's length and Redis ``used_memory`` (maxima kept)."""

    def __init__(self, r: Any) -> None:
        super().__init__(daemon=True)
        self.r, self.stop = r, threading.Event()
        self.max_len = 0
        self.max_mem = 0

    def run(self) -> None:
        from worker.broker.config import ENGINE_BULK_QUEUE

        while not self.stop.is_set():
            with contextlib.suppress(Exception):
                self.max_len = max(self.max_len, int(self.r.llen(ENGINE_BULK_QUEUE)))
                self.max_mem = max(self.max_mem, int(self.r.info("memory")["used_memory"]))
            time.sleep(0.1)


def used_memory(r: Any) -> int:
    return int(r.info("memory")["used_memory"])


def dataset_bytes(r: Any) -> int:
    """Sum of ``MEMORY USAGE`` over every key (what the data holds; connection buffers left out)."""
    return sum(int(r.memory_usage(k, samples=0) or 0) for k in r.scan_iter(count=1000))


def calibrate(env: dict[str, str], refs: list[str], photos_per: list[int]) -> dict[str, Any]:
    """In this process, against the same services: enrol one subject per entry of ``photos_per`` (S3 calls
    counted per subject), then re-enrol them: the one-photo subjects as one chunk (timed: serial cost per subject
    before and after the engine call), every subject alone too for its S3 calls."""
    from worker.contracts import ReenrollChunk, job_from_wire
    from worker.service import reissue
    from worker.service.clock import now
    from worker.service.enrol import enroll
    from worker.settings import get_settings
    from worker.tasks import runtime

    os.environ.update({k: v for k, v in env.items() if k.startswith("CANCELABLE_")})
    get_settings.cache_clear()
    runtime.reset_runtime()
    rt = runtime.get_runtime()
    counter = S3Counter(rt.store.client)
    rt.engine()  # load before counting
    marks: dict[str, float] = {}
    real_call = rt.engine_call

    def timed_call(job_type: str, subjects: Any) -> Any:
        marks["engine_start"] = time.perf_counter()
        out = real_call(job_type, subjects)
        marks["engine_end"] = time.perf_counter()
        return out

    rt.engine_call = timed_call  # type: ignore[method-assign]
    enrol_counts: list[tuple[int, Counter[str]]] = []
    enrol_prep, enrol_commit = [], []
    for i, n in enumerate(photos_per):
        job = job_from_wire(
            {
                "kind": "enroll",
                "job_id": f"calib-enrol-{i}",
                "tenant": "calib",
                "subject": f"c{i}",
                "images": [refs[(i + j) % len(refs)] for j in range(n)],
                "key_id": "k1",
            }
        )
        before = counter.snapshot()
        t0 = time.perf_counter()
        enroll(rt, job, 1, now())
        t1 = time.perf_counter()
        enrol_counts.append((n, counter.snapshot() - before))
        if n == 1:
            enrol_prep.append(marks["engine_start"] - t0)
            enrol_commit.append(t1 - marks["engine_end"])

    # one chunk of the one-photo subjects: wall before the engine call, in it, after it
    ones = [f"c{i}" for i, n in enumerate(photos_per) if n == 1]
    chunk = ReenrollChunk(
        job_id="calib-chunk-1", parent_job_id="calib-revoke-1", tenant="calib", subjects=ones, reason="capacity"
    )
    before = counter.snapshot()
    t0 = time.perf_counter()
    reissue.reenroll(rt, chunk, 1, now())
    t1 = time.perf_counter()
    chunk_counts = counter.snapshot() - before
    prep = (marks["engine_start"] - t0) / len(ones)
    commit = (t1 - marks["engine_end"]) / len(ones)
    # one subject per chunk, each photo count: per-subject S3 calls of a re-enrolment
    reenrol_counts: list[tuple[int, Counter[str]]] = [(1, Counter({k: v / len(ones) for k, v in chunk_counts.items()}))]
    for i, n in enumerate(photos_per):
        if n == 1:
            continue
        c = ReenrollChunk(
            job_id=f"calib-chunk-2-{i}",
            parent_job_id=f"calib-revoke-2-{i}",
            tenant="calib",
            subjects=[f"c{i}"],
            reason="capacity",
        )
        before = counter.snapshot()
        reissue.reenroll(rt, c, 1, now())
        reenrol_counts.append((n, counter.snapshot() - before))
    rt.engine_call = real_call  # type: ignore[method-assign]
    runtime.reset_runtime()
    return {
        "enroll": enrol_counts,
        "reenroll": reenrol_counts,
        "enrol_prep": sum(enrol_prep) / len(enrol_prep),
        "enrol_commit": sum(enrol_commit) / len(enrol_commit),
        "prep": prep,
        "commit": commit,
        "chunk": len(ones),
    }


def per_photo(counts: list[tuple[int, Counter[str]]]) -> dict[str, tuple[float, float]]:
    """{op: (fixed, per photo)} from counts at two photo numbers (1 and 2)."""
    by_n = {n: c for n, c in counts}
    ops = sorted(set().union(*[set(c) for _, c in counts]))
    out = {}
    for op in ops:
        one, two = by_n[1].get(op, 0), by_n[2].get(op, 0)
        out[op] = (one - (two - one), two - one)
    return out


def message_bytes(r: Any, client: Any, refs: list[str], n: int = 500) -> tuple[float, int]:
    """Redis memory per queued enrol message on the bulk queue (``submit_many(background=True)``: the envelope a bulk
    child has), and the length of one message."""
    from worker.broker.config import ENGINE_BULK_QUEUE

    jobs = [client.enroll_job("acme", f"msg{i:05d}", [refs[i % len(refs)]], "k1") for i in range(n)]
    r.delete(ENGINE_BULK_QUEUE)
    client.submit_many(jobs, background=True)
    m1 = used_memory(r)
    one = len(r.lindex(ENGINE_BULK_QUEUE, 0))
    r.delete(ENGINE_BULK_QUEUE)
    m2 = used_memory(r)
    for j in jobs:
        r.delete(f"cf:submitted:{j.ref}")
    return (m1 - m2) / n, one


BATCH_LOG = re.compile(r"engine batch: (\w+), \d+ jobs, (\d+) images, ([\d.]+) s, ([\d.]+) CPU s")


def engine_rate(log: Path, offset: int, lane: str) -> tuple[float, int]:
    """(images/s inside the worker's engine calls, images) from the batch log lines of ``lane`` after ``offset``."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    rows = [(int(m.group(2)), float(m.group(3))) for m in BATCH_LOG.finditer(text) if m.group(1) == lane]
    images, wall = sum(n for n, _ in rows), sum(w for _, w in rows)
    return (images / wall if wall else 0.0), images


def run_job(client: Any, r: Any, job: Any, timeout: float = 3600) -> dict[str, Any]:
    from worker.contracts import JobStatus

    sampler = Sampler(r)
    m0 = dataset_bytes(r)
    sampler.start()
    t0 = time.perf_counter()
    client.submit(job)
    res = client.wait(job.ref, timeout=timeout, poll=0.1)
    dt = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    time.sleep(0.5)
    if JobStatus(res.status) != JobStatus.SUCCEEDED:
        raise RuntimeError(f"{job.kind} job ended {res.status}: {res}")
    return {"seconds": dt, "max_queue": sampler.max_len, "mem_growth": dataset_bytes(r) - m0, "result": res}


def fanout_check(client: Any, r: Any, s3: Any, refs: list[str], rows: int = 64, chunk: int = 4) -> dict[str, Any]:
    """A bulk job with no engine worker running: the control task fills the window (8 chunks) and then its
    continuations, ``BULK_PAUSE_S`` apart, send nothing while the queue stays deep. Watches the queue's length for
    four pauses after it first passes the window; returns its deepest length, when it got there and the length over
    time; the children and the job's pending continuation are deleted afterwards."""
    from worker.broker.config import ENGINE_BULK_QUEUE

    manifest = b"".join(
        (json.dumps({"subject": f"f{i:04d}", "images": [refs[i % len(refs)]]}) + "\n").encode() for i in range(rows)
    )
    key = "tenants/acme/manifests/fanout.jsonl"
    s3.put_object(Bucket=INPUTS, Key=key, Body=manifest)
    r.delete(ENGINE_BULK_QUEUE)
    job = client.bulk_job("acme", "k1", f"s3://{INPUTS}/{key}", chunk_size=chunk)
    t0 = time.perf_counter()
    client.submit(job)
    seen: list[tuple[float, int]] = []
    window_at = None
    while time.perf_counter() - t0 < 300:
        n = int(r.llen(ENGINE_BULK_QUEUE))
        if not seen or n != seen[-1][1]:
            seen.append((time.perf_counter() - t0, n))
        if window_at is None and n > BULK_MAX_QUEUE_DEPTH_CHUNKS * chunk:
            window_at = time.perf_counter()
        if n >= rows or (window_at is not None and time.perf_counter() - window_at > 4 * BULK_PAUSE_S + 2):
            break
        time.sleep(0.05)
    r.delete(ENGINE_BULK_QUEUE)
    deepest = max(seen, key=lambda s: s[1])
    return {"seconds": deepest[0], "queued": deepest[1], "steps": seen}


def validate(a: argparse.Namespace) -> int:
    from worker_harness import _faces_dir, jpeg_bytes, start_worker

    faces = _faces_dir()
    if faces is None:
        print("sample faces (../shared/data/faces-smoke/obama-biden) not found; nothing measured")
        return 1
    work = a.work or Path(tempfile.mkdtemp(prefix="capacity-"))
    work.mkdir(parents=True, exist_ok=True)
    procs, url, svc = bs.start_services(work)
    workers: list[Any] = []
    try:
        import redis

        env = bs.service_env(url, svc, work)
        ns = argparse.Namespace(bundle=a.bundle, batch_steps=a.steps, fill_timeout_ms=100, mate_wait_ms=5000)
        e = bs.engine_env(env, work, ns, bs.start_port(), "cap")
        s3 = svc.client()
        with contextlib.suppress(Exception):
            s3.create_bucket(Bucket=INPUTS)
        photos = [jpeg_bytes(p) for p in sorted(faces.glob("*.jpg"))]
        refs: dict[str, list[str]] = {}
        for tenant in ("acme", "calib"):
            refs[tenant] = []
            for i, body in enumerate(photos):
                key = f"tenants/{tenant}/in/{i}.jpg"
                s3.put_object(Bucket=INPUTS, Key=key, Body=body)
                refs[tenant].append(f"s3://{INPUTS}/{key}")
        n = a.subjects
        print(
            f"capacity validation: {n} one-photo subjects, {a.bundle} bundle, {a.steps} steps, CPU, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )

        def rate(when: str) -> float:
            _, wall = bs.inprocess_cpu_per_image(e, photos, n)
            ips = n / wall
            print(
                f"  in-process Engine.enroll_many ({when}), {n} one-image subjects, batches of 8: "
                f"{ips:.3f} images/s ({wall:.1f} s)",
                flush=True,
            )
            return ips

        ips_before = rate("before")
        cal = calibrate(e, refs["calib"], [1, 1, 1, 1, 2])
        enroll_s3, reenroll_s3 = per_photo(cal["enroll"]), per_photo(cal["reenroll"])
        for what, table, coded in (("enrolment", enroll_s3, ENROLL_S3), ("re-enrolment", reenroll_s3, REENROLL_S3)):
            got = ", ".join(f"{op} {f:g} + {p:g}/photo" for op, (f, p) in table.items())
            same = {op: v for op, v in table.items() if any(v)} == {op: v for op, v in coded.items() if any(v)}
            print(f"  S3 calls per subject, {what}: {got} (the model's table in capacity.py matches: {same})")
        print(
            f"  one enrol job alone, wall: {cal['enrol_prep']:.3f} s before the engine call, "
            f"{cal['enrol_commit']:.3f} s after it"
        )
        print(
            f"  re-enrolment chunk of {cal['chunk']} one-photo subjects, serial wall per subject: "
            f"{cal['prep']:.3f} s before the engine call, {cal['commit']:.3f} s after it",
            flush=True,
        )

        r = redis.Redis.from_url(url)
        os.environ.update({k: v for k, v in e.items() if k.startswith("CANCELABLE_")})
        from producers.client import Client

        probe = Client()
        msg_b, msg_len = message_bytes(r, probe, refs["acme"])
        probe.close()
        print(f"  Redis per queued enrol message on the bulk queue: {msg_b:.0f} B ({msg_len} B of message)")

        workers.append(start_worker(e, work / "control.log", queues="control", concurrency=1, pool="prefork"))
        fan_client = Client()
        fan_client.ping(timeout=120)
        fan = fanout_check(fan_client, r, s3, refs["acme"])
        fan_client.close()
        steps = ", ".join(f"{n} at {t:.1f} s" for t, n in fan["steps"])
        print(f"  bulk fan-out with no engine worker, 64 rows in chunks of 4: queue length {steps}", flush=True)
        worker, client = bs.start_engine(e, work, "cap", "threads", bs.ENGINE_THREADS)
        workers.append(worker)
        client.run(client.enroll_job("calib", "warm", [refs["calib"][0]], "k1"), timeout=600)  # lazy loads

        manifest = b"".join(
            (json.dumps({"subject": f"s{i:04d}", "images": [refs["acme"][i % len(photos)]]}) + "\n").encode()
            for i in range(n)
        )
        key = "tenants/acme/manifests/capacity.jsonl"
        s3.put_object(Bucket=INPUTS, Key=key, Body=manifest)
        off = worker.log.stat().st_size
        bulk = run_job(client, r, client.bulk_job("acme", "k1", f"s3://{INPUTS}/{key}"))
        bulk["in_run"] = engine_rate(worker.log, off, "enroll")[0]
        print(
            f"  bulk enrolment, {n} subjects: {bulk['seconds']:.1f} s, deepest bulk queue {bulk['max_queue']}, "
            f"Redis +{bulk['mem_growth'] / n:.0f} B per subject after it",
            flush=True,
        )
        off = worker.log.stat().st_size
        rev = run_job(client, r, client.revoke_job("acme", "capacity", key_id="k1", new_key_id="k2"))
        rev["in_run"] = engine_rate(worker.log, off, "reenroll")[0]
        print(
            f"  key revocation, {n} subjects: {rev['seconds']:.1f} s, deepest bulk queue {rev['max_queue']}, "
            f"Redis +{rev['mem_growth'] / n:.0f} B per subject after it",
            flush=True,
        )
        client.close()
        for w in workers:
            w.stop()
        workers.clear()
        ips_after = rate("after, workers stopped")

        ips = (ips_before + ips_after) / 2
        fleet = Fleet(
            workers=1,
            images_per_s=ips,
            enrol_prep_s=cal["enrol_prep"],
            enrol_commit_s=cal["enrol_commit"],
            prep_parallel=max(1, (os.cpu_count() or 2) - 1),  # the engine thread holds one core
            list_subjects_per_s=SCAN_LIST_PER_S,
            prep_s_per_subject=cal["prep"],
            commit_s_per_subject=cal["commit"],
            message_bytes=msg_b,
            book_bytes_per_subject=bulk["mem_growth"] / n,
            revoke_book_bytes_per_subject=rev["mem_growth"] / n,
        )
        print(
            f"model inputs: images/s {ips:.3f} (mean of both), prep {cal['prep']:.3f} s and commit "
            f"{cal['commit']:.3f} s per subject in a chunk, {msg_b:.0f} B per queued message"
        )
        ok = True
        for kind, got in (("bulk", bulk), ("revoke", rev)):
            job = Job(n, 1, kind)
            for source, f in (
                ("in-process images/s", fleet),
                (
                    f"the worker's own engine calls, {got['in_run']:.3f} images/s",
                    replace(fleet, images_per_s=got["in_run"]),
                ),
            ):
                p = predict(f, job)
                err = (p.seconds - got["seconds"]) / got["seconds"]
                ok &= abs(err) <= 0.20 or not source.startswith("the worker")
                print(
                    f"  {kind:<6} predicted {p.seconds:7.1f} s, measured {got['seconds']:7.1f} s: {err:+.0%} "
                    f"(rate from {source}); queue predicted {p.max_queue_messages}, measured {got['max_queue']}"
                )
            print(f"         {describe(f, job, p)}")
        fan_fleet = Fleet(workers=1, images_per_s=1e-9, concurrency=0, bulk_chunk=4)
        fan_q = predict(fan_fleet, Job(64)).max_queue_messages
        ok &= fan["queued"] == fan_q
        print(
            f"  fan-out with no engine worker: deepest queue predicted {fan_q}, measured {fan['queued']} (reached at "
            f"{fan['seconds']:.1f} s; the window of 8 chunks plus the chunk sent before the first pause, then nothing "
            f"more while the queue stays deep)"
        )
        print(
            f"within 20 % with the rate of the worker's own engine calls: {ok}; load average after "
            f"{os.getloadavg()[0]:.1f}"
        )
        return 0 if ok else 2
    finally:
        for w in workers:
            w.stop()
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
