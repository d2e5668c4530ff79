"""Benchmark (not a test) of the queueing side: enqueue rate and bulk manifest streaming, against real services.

Starts a private redis-server and SeaweedFS (``weed mini``) with the integration tests' helpers, then prints:

submit
    ``Client.submit`` (one Redis round trip per job, plus one for its submit marker) vs ``Client.submit_many``
    (pipelined: one round trip per batch of 500 + one for the markers), enroll jobs, each run in a fresh producer
    process (jobs made by a generator), reporting jobs/s and the process's peak RSS.

bulk
    A 1,000,000-row JSONL manifest, then a CSV one, streamed by a real control worker process (``celery worker -Q
    control -c 1``, chunk 500, fan-out time budget 20 s so it hands over to continuations along the way). No engine
    worker: a drainer empties the engine queue (counting what it removes) so the backpressure pause never triggers; what
    is measured is manifest reading + child building + publishing. Prints rows/s (submit to ``listing=done``, all
    children counted), the control worker's peak RSS (pool child and main process), and the continuation start cost: the
    wall time of one continuation (ranged GET, one chunk of 500 rows sent, hand-over) resuming at cursor 0 and near the
    end of the manifest, in-process against the same services; plus, for contrast, a continuation from a cursor saved
    without a byte offset (what every continuation did before: re-read and re-parse from row 0).

revoke
    Key revocation scheduling: N subjects' S3 records are seeded directly with the storage classes (subject key record,
    current pointer and the key's subject index markers, what enrolment and commit write; no engine work), then a
    key-level revoke runs in-process against the same Redis and SeaweedFS: mark the key revoked, list its subjects,
    send the re-enrolment chunks to the engine queue (left there, not run). Prints subjects/s from the first task's
    start to ``listing=done`` (continuations run back to back), the hand-overs, and checks that every subject under
    the key is in exactly one chunk on the queue and nothing else is. Runs the index listing at each size, the
    record scan (no index: what a key without a complete index, or the code before it, does) at the first size, and a
    hand-over run: a small time budget over the last size, so the listing hands over after every few chunks.

engine micro-batching
    (a) A deep queue: ``--batch-jobs`` (64) one-photo enrol jobs queued at once (``submit_many``) for a real engine
    worker, warmed up by one job, on the threads pool (``--pool threads -c 16``, ``max_batch_images`` 8, the
    ``--bundle`` (lite) on the CPU, 1 torch thread, ``--batch-steps`` optimisation steps). Prints the worker
    process's CPU seconds per image (from /proc, from the first submit to the last result: download, decode, align,
    key, engine, PNG, commit, Celery) next to the CPU seconds per image of ``Engine.enroll_many`` alone, in-process,
    on the same aligned faces at the same batch size (the ratio; target <= 1.10), and the mean of the batch-size
    metric served by the worker (target >= 0.9 x 8). The engine thread's CPU seconds come from the batcher's
    per-batch log line.
    (b) A lone enrol on an idle worker, ``--lone-runs`` times each: threads pool with micro-batching on, the same
    worker with ``engine.micro_batching=false``, and the prefork pool (before micro-batching), after one untimed
    warm-up job; median end-to-end latency (submit to stored result, polled every 5 ms) and median time inside the
    task.

Run: .venv/bin/python scripts/bench_system.py [--rows 1000000] [--formats jsonl,csv] [--skip-submit] [--skip-bulk]
     [--revoke-sizes 10000,20000] [--revoke-handover-budget 0.2] [--revoke-markers-only] [--skip-revoke]
     [--skip-batching] [--batch-jobs 64] [--batch-steps 50] [--lone-runs 5] [--fill-timeout-ms 100]
     [--mate-wait-ms 5000] [--bundle lite] [--work DIR (keep the services' data and worker logs)]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT))
from worker.broker.config import ENGINE_BULK_QUEUE, ENGINE_INTERACTIVE_QUEUE, ENGINE_QUEUES  # noqa: E402

VENV_BIN = Path(sys.executable).parent

BULK_CHUNK = 500
BULK_BUDGET_S = 20.0


# --- services ---------------------------------------------------------------------------------------------------------
def start_services(work: Path) -> tuple[list[Any], str, Any]:
    from conftest import start_redis, start_seaweed  # the integration tests' helpers

    rproc, url = start_redis(work)
    svc = start_seaweed(work, bucket="bench")
    return [rproc, svc.proc], url, svc


def service_env(url: str, svc: Any, work: Path) -> dict[str, str]:
    from worker.keys.providers import write_keyring

    write_keyring(work / "keyring.json", ["k1", "k2"])
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CANCELABLE_")}
    env.update(svc.env("bench"))
    env.update(
        {
            "CANCELABLE_REDIS__URL": url,
            "CANCELABLE_KEYS__PROVIDER": "local",
            "CANCELABLE_KEYS__KEYRING_PATH": str(work / "keyring.json"),
            "CANCELABLE_METRICS__ENABLED": "false",
            "CANCELABLE_WORKER__FANOUT_TIME_BUDGET": str(BULK_BUDGET_S),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


# --- submit -----------------------------------------------------------------------------------------------------------
def _submit_child(mode: str, n: int) -> None:
    """In a fresh process (env from the parent): queue ``n`` enroll jobs; prints one JSON line."""
    from producers.client import Client

    client = Client()
    client.redis.flushdb()
    client.app.connection_for_write().ensure_connection()
    base = int(client.redis.info("memory")["used_memory"])

    def jobs() -> Any:
        for i in range(n):
            yield {
                "kind": "enroll",
                "job_id": f"bench-{mode}-{i:09d}",
                "tenant": "acme",
                "subject": f"s{i:09d}",
                "images": [f"s3://bench-inputs/tenants/acme/{i:09d}.jpg"],
                "key_id": "k1",
            }

    t0 = time.perf_counter()
    if mode == "submit":
        for job in jobs():
            client.submit(job)
    else:
        client.submit_many(jobs())
    dt = time.perf_counter() - t0
    queued = int(client.redis.llen(ENGINE_INTERACTIVE_QUEUE))
    mem = int(client.redis.info("memory")["used_memory"]) - base  # queue items + submit markers
    print(
        json.dumps(
            {
                "mode": mode,
                "jobs": n,
                "seconds": dt,
                "jobs_per_s": n / dt,
                "queued": queued,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "redis_bytes_per_job": mem / max(queued, 1),
            }
        )
    )
    client.redis.flushdb()


def bench_submit(env: dict[str, str], sizes: list[tuple[str, int]]) -> list[dict[str, Any]]:
    out = []
    for mode, n in sizes:
        p = subprocess.run(
            [sys.executable, __file__, "_submit", mode, str(n)], env=env, capture_output=True, text=True, check=False
        )
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = out[-1]
        print(
            f"  {mode:<12} {n:>7} jobs: {r['jobs_per_s']:>8.0f} jobs/s  ({r['seconds']:.1f} s), producer peak RSS "
            f"{r['rss_mb']:.0f} MB, {r['queued']} on the queue, Redis {r['redis_bytes_per_job']:.0f} B/job",
            flush=True,
        )
    return out


# --- bulk -------------------------------------------------------------------------------------------------------------
CSV_HEADER = b"subject,image\n"


def manifest_line(i: int, fmt: str) -> bytes:
    if fmt == "csv":
        return f"s{i:07d},s3://bench-inputs/in/{i:07d}.jpg\n".encode()
    return (json.dumps({"subject": f"s{i:07d}", "images": [f"s3://bench-inputs/in/{i:07d}.jpg"]}) + "\n").encode()


def write_manifest(path: Path, rows: int, fmt: str) -> list[int]:
    """The manifest file; returns the byte offset after every 1000th row (offsets[k] = after row 1000*k)."""
    head = CSV_HEADER if fmt == "csv" else b""
    offsets = [len(head)]
    pos = len(head)
    with path.open("wb") as f:
        f.write(head)
        for i in range(1, rows + 1):
            line = manifest_line(i, fmt)
            f.write(line)
            pos += len(line)
            if i % 1000 == 0:
                offsets.append(pos)
    return offsets


class Drainer(threading.Thread):
    """Empties the engine queue every 20 ms (atomically: LLEN + DEL in one script), counting the messages."""

    SCRIPT = "local n = redis.call('LLEN', KEYS[1]) redis.call('DEL', KEYS[1]) return n"

    def __init__(self, url: str) -> None:
        import redis

        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url)
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.count += int(self.r.eval(self.SCRIPT, 1, ENGINE_BULK_QUEUE))
            time.sleep(0.02)
        self.count += int(self.r.eval(self.SCRIPT, 1, ENGINE_BULK_QUEUE))


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def bench_bulk(env: dict[str, str], url: str, svc: Any, work: Path, rows: int, fmt: str) -> dict[str, Any]:
    import redis

    s3 = svc.client()
    path = work / f"manifest.{fmt}"
    key = f"tenants/acme/manifests/bench.{fmt}"  # the tenant's input prefix: where a bulk job may read it
    uri = f"s3://bench-inputs/{key}"
    t = time.perf_counter()
    offsets = write_manifest(path, rows, fmt)
    with contextlib.suppress(Exception):  # already there from an earlier format
        s3.create_bucket(Bucket="bench-inputs")
    s3.upload_file(str(path), "bench-inputs", key)
    path.unlink()
    print(
        f"  {fmt} manifest: {rows} rows, {offsets[-1] / 1e6:.1f} MB, written and uploaded in "
        f"{time.perf_counter() - t:.1f} s"
    )

    log = work / "control.log"
    argv = [str(VENV_BIN / "celery"), "-A", "worker.tasks.app", "worker", "-Q", "control", "-c", "1"]
    argv += ["--pool", "prefork", "-n", "benchctl@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    argv += ["-l", "WARNING"]
    with open(log, "wb") as f:
        worker = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    os.environ.update({k: v for k, v in env.items() if k.startswith("CANCELABLE_")})
    from producers.client import Client

    client = Client()
    try:
        client.ping(timeout=120)
        r = redis.Redis.from_url(url)
        r.delete(ENGINE_BULK_QUEUE)
        drainer = Drainer(url)
        drainer.start()
        peak = {"child": 0.0, "main": 0.0}
        job = client.bulk_job("acme", "k1", uri, chunk_size=BULK_CHUNK)
        t0 = time.perf_counter()
        client.submit(job)
        while True:
            peak["main"] = max(peak["main"], rss_mb(worker.pid))
            for c in children(worker.pid):
                peak["child"] = max(peak["child"], rss_mb(c))
            book = client.book.get_fields(job.ref)
            if book.get("listing") == "done":
                break
            if worker.poll() is not None:
                raise RuntimeError(f"control worker exited:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - t0 > 3600:
                raise RuntimeError(f"bulk not done after an hour: {book}")
            time.sleep(0.25)
        dt = time.perf_counter() - t0
        time.sleep(0.2)
        drainer.stop.set()
        drainer.join()
        continuations = len(r.keys(f"cf:attempts:{job.ref}-c*"))
        res: dict[str, Any] = {
            "rows": rows,
            "seconds": dt,
            "rows_per_s": rows / dt,
            "children_counted": drainer.count,
            "total": int(book.get("total", "0")),
            "tasks": continuations,
            "rss_child_mb": peak["child"],
            "rss_main_mb": peak["main"],
        }
        print(
            f"  streamed {rows} rows in {dt:.1f} s: {res['rows_per_s']:.0f} rows/s; {drainer.count} children reached "
            f"the engine queue; {continuations} tasks (first + continuations); control worker peak RSS: pool child "
            f"{peak['child']:.0f} MB, main {peak['main']:.0f} MB",
            flush=True,
        )
    finally:
        client.close()
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
    res["continuation"] = bench_continuation(url, svc, offsets, rows, fmt, uri)
    return res


def bench_continuation(url: str, svc: Any, offsets: list[int], rows: int, fmt: str, uri: str) -> dict[str, Any]:
    """One continuation (one chunk sent, then hand-over) resuming at cursor 0 / near the end; and from a cursor
    without a byte offset (the old way: re-read from row 0). In-process, against the same Redis and SeaweedFS."""
    import redis

    from worker.contracts import job_from_wire
    from worker.service import bulk
    from worker.service.clock import now
    from worker.settings import get_settings
    from worker.tasks import control_tasks, runtime

    get_settings.cache_clear()
    rt = runtime.Runtime(get_settings())
    runtime._runtime = rt
    rt.settings.worker.fanout_time_budget = 0.0  # hand over after the first chunk
    r = redis.Redis.from_url(url)

    class Task:
        def apply_async(self, **kw: Any) -> None:
            pass

    def one(cursor: int, with_offset: bool, tag: str) -> float:
        job = job_from_wire(
            {
                "kind": "bulk",
                "job_id": f"bench-cont-{fmt}-{tag}-{cursor}",
                "tenant": "acme",
                "key_id": "k1",
                "chunk_size": BULK_CHUNK,
                "manifest": {"format": fmt, "uri": uri},
            }
        )
        key = f"cf:job:{job.ref}"
        r.delete(key)
        if cursor:
            fields: dict[Any, Any] = {"kind": "bulk", "state": "running", "cursor": str(cursor)}
            if with_offset:
                k = cursor // 1000
                head = len(CSV_HEADER) if fmt == "csv" else 0
                fields.update(
                    resume_index=str(cursor),
                    resume_offset=str(offsets[k]),
                    resume_lines=str(cursor + (1 if head else 0)),
                    header_bytes=str(head),
                )
            r.hset(key, mapping=fields)
        r.delete(ENGINE_BULK_QUEUE)
        t = time.perf_counter()
        bulk.bulk(rt, job, 1, now(), control_tasks.CeleryDispatch(Task(), job.job_id, rt.redis), 1)
        dt = time.perf_counter() - t
        got = r.llen(ENGINE_BULK_QUEUE)
        r.delete(ENGINE_BULK_QUEUE)
        assert got == BULK_CHUNK, (tag, cursor, got)
        return dt

    near_end = (rows - 2 * BULK_CHUNK) // 1000 * 1000
    old_cursor = min(100_000, near_end)
    out: dict[str, Any] = {}
    for label, cursor, with_offset in (
        ("cursor 0", 0, True),
        (f"cursor {near_end} (byte offset)", near_end, True),
        (f"cursor {old_cursor} (no byte offset: re-read from row 0)", old_cursor, False),
    ):
        times = sorted(one(cursor, with_offset, f"{i}{int(with_offset)}") for i in range(3 if with_offset else 1))
        out[label] = times[len(times) // 2]
        print(f"  continuation at {label}: {out[label] * 1000:.0f} ms (median of {len(times)}; 500 rows sent)")
    return out


# --- revoke -----------------------------------------------------------------------------------------------------------
SEED_THREADS = 16


def seed_subjects(
    store: Any, tenant: str, key_id: str, names: list[str], committed: bool = True, records: bool = True
) -> None:
    """What a first enrolment and its commit leave for each subject, written directly: index ``p`` and ``key.json``
    (``KeyRegistry.ensure_subject_key``), ``current.json`` and index ``c`` (the commit's pointer move). Without
    ``records``, only the two index markers (all a complete index's listing reads of a committed subject)."""
    from concurrent.futures import ThreadPoolExecutor

    from worker.storage import layout
    from worker.storage.keyindex import KeyIndex
    from worker.storage.records import CurrentPointer, SubjectKeyRecord

    index = KeyIndex(store)

    def one(s: str) -> None:
        index.pending(tenant, key_id, s)
        if records:
            record = SubjectKeyRecord(tenant=tenant, subject=s, key_id=key_id, key_version=1)
            store.put_json(layout.subject_key_state(tenant, s), record)
        if committed:
            if records:
                pointer = CurrentPointer(
                    version=1, manifest_key=layout.version_key(tenant, s, 1), job_id="bench-enrol-0001", key_epoch=1
                )
                store.put_json(layout.current_key(tenant, s), pointer)
            index.committed(tenant, key_id, s)

    with ThreadPoolExecutor(SEED_THREADS) as pool:
        for _ in pool.map(one, names):
            pass


def queued_chunk_subjects(r: Any) -> list[str]:
    """Every subject named by the re-enrolment chunks on the engine queue (Celery messages, protocol 2)."""
    import base64

    out: list[str] = []
    for raw in r.lrange(ENGINE_BULK_QUEUE, 0, -1):
        env = json.loads(raw)
        args = json.loads(base64.b64decode(env["body"]))[0]
        out += args[0]["subjects"]
    return out


def run_key_revoke(rt: Any, r: Any, tenant: str, key_id: str, tag: str) -> dict[str, Any]:
    """One key-level revoke's scheduling phase, in-process: the first task, then each continuation it hands over
    to, back to back, until the listing is done."""
    from worker.contracts import job_from_wire
    from worker.service import revoke
    from worker.service.clock import now
    from worker.tasks import control_tasks

    class Task:
        def __init__(self) -> None:
            self.continued: list[dict[str, Any]] = []

        def apply_async(self, **kw: Any) -> None:
            self.continued.append(kw)

    job = job_from_wire(
        {
            "kind": "revoke",
            "job_id": f"bench-revoke-{tag}",
            "tenant": tenant,
            "key_id": key_id,
            "new_key_id": "k2",
            "reason": "bench",
        }
    )
    r.delete(ENGINE_BULK_QUEUE)
    task = Task()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    continuation = 0
    while True:
        revoke.revoke(rt, job, 1, now(), control_tasks.CeleryDispatch(task, job.job_id, rt.redis), continuation)
        if len(task.continued) == continuation:  # the listing finished instead of handing over
            break
        continuation += 1
    dt = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    fields = rt.book.get_fields(job.ref)
    assert fields.get("listing") == "done", fields
    return {
        "seconds": dt,
        "cpu": cpu,
        "handovers": len(task.continued),
        "chunks": int(fields["chunks_sent"]),
        "listed": int(fields["subjects_listed"]),
        "mode": fields.get("listing_mode"),
        "queued": int(r.llen(ENGINE_BULK_QUEUE)),
    }


def bench_revoke(
    url: str, svc: Any, sizes: list[int], handover_budget: float, markers_only: bool = False
) -> list[dict[str, Any]]:
    import redis

    from worker.settings import get_settings
    from worker.storage import layout
    from worker.storage.keyindex import KeyIndex
    from worker.tasks import runtime

    get_settings.cache_clear()
    rt = runtime.Runtime(get_settings())
    runtime._runtime = rt
    r = redis.Redis.from_url(url)
    budget = rt.settings.worker.fanout_budget
    print(f"  (chunk size {rt.settings.worker.revoke_chunk_size}, fan-out time budget {budget:.0f} s)", flush=True)
    out = []
    runs: list[tuple[int, str, float | None]] = [(n, "index", None) for n in sizes]
    if not markers_only:  # the scan reads the records
        runs.insert(1, (sizes[0], "scan", None))
    runs.append((sizes[-1], "index", handover_budget))
    seeded: dict[int, str] = {}
    for n, mode, small_budget in runs:
        tenant = f"t{n}"
        if n not in seeded:
            subjects = [f"s{i:07d}" for i in range(n)]
            extra = max(n // 100, 1)
            t = time.perf_counter()
            seed_subjects(rt.store, tenant, "k1", subjects, records=not markers_only)
            seed_subjects(rt.store, tenant, "k9", [f"o{i:07d}" for i in range(extra)])  # under another key
            seed_subjects(rt.store, tenant, "k1", [f"n{i:07d}" for i in range(extra)], committed=False)
            KeyIndex(rt.store).mark_complete(tenant, "k1")  # index-aware writers from the start
            dt = time.perf_counter() - t
            objs = (2 if markers_only else 4) * n + 4 * extra + 2 * extra
            what = " (index markers only: no key.json/current.json for them)" if markers_only else ""
            print(
                f"  seeded {n} subjects under the key{what} (+{extra} under another key, +{extra} never committed): "
                f"{objs} objects in {dt:.1f} s ({objs / dt:.0f} PUT/s)",
                flush=True,
            )
            seeded[n] = tenant
        state = layout.key_index_state(tenant, "k1")
        if mode == "scan":
            rt.store.delete(state)
        rt.settings.worker.fanout_time_budget = small_budget
        try:
            res = run_key_revoke(rt, r, tenant, "k1", f"{n}-{mode}-{int((small_budget or 0) * 1000)}ms")
        finally:
            rt.settings.worker.fanout_time_budget = None
            if mode == "scan":
                KeyIndex(rt.store).mark_complete(tenant, "k1")
        got = queued_chunk_subjects(r)
        r.delete(ENGINE_BULK_QUEUE)
        expected = [f"s{i:07d}" for i in range(n)]
        once = len(got) == len(set(got)) == n and sorted(got) == expected
        res.update(n=n, exactly_once=once, rate=n / res["seconds"])
        out.append(res)
        label = f"{res['mode']} listing" + (f", budget {small_budget} s" if small_budget is not None else "")
        print(
            f"  {label:<24} {n:>7} subjects: {res['rate']:>7.0f} subjects/s ({res['seconds']:.2f} s, process CPU "
            f"{res['cpu']:.2f} s); {res['chunks']} chunks ({res['queued']} on the queue); {res['handovers']} "
            f"hand-overs; every subject under the key in exactly one chunk, no other: {once}",
            flush=True,
        )
    return out


# --- engine micro-batching --------------------------------------------------------------------------------------------
BATCH = 8  # max_batch_images of the benchmarked deployment
ENGINE_BATCH_LOG = re.compile(r"engine batch: enroll, \d+ jobs, \d+ images, [\d.]+ s, ([\d.]+) CPU s")
BATCH_WAIT_LOG = re.compile(r"engine batch: enroll, .* oldest job waited ([\d.]+) ms")
ENGINE_THREADS = 2 * BATCH


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) and of its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def batch_histogram(port: int) -> dict[str, float]:
    """``sum`` and ``count`` of ``cancelable_batch_size_images{job_type="enroll"}`` served by a worker."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"sum": 0.0, "count": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name == "cancelable_batch_size_images":
            for smp in fam.samples:
                if smp.labels.get("job_type") == "enroll" and smp.name.endswith(("_sum", "_count")):
                    out[smp.name.rsplit("_", 1)[1]] = smp.value
    return out


def engine_env(env: dict[str, str], work: Path, args: argparse.Namespace, port: int, tag: str) -> dict[str, str]:
    e = dict(env)
    e.update(
        {
            "CANCELABLE_ENGINE__BUNDLE": args.bundle,
            "CANCELABLE_ENGINE__DEVICE": "cpu",
            "CANCELABLE_ENGINE__STEPS": str(args.batch_steps),
            "CANCELABLE_ENGINE__BATCH_SIZE": str(BATCH),
            "CANCELABLE_ENGINE__MIXED_PRECISION": "false",
            "CANCELABLE_ENGINE__BATCH_FILL_TIMEOUT_MS": str(args.fill_timeout_ms),
            "CANCELABLE_ENGINE__BATCH_MATE_WAIT_MS": str(args.mate_wait_ms),
            "CANCELABLE_TORCH_THREADS": "1",
            "CANCELABLE_METRICS__ENABLED": "true",
            "CANCELABLE_METRICS__HOST": "127.0.0.1",
            "CANCELABLE_METRICS__PORT": str(port),
            "PROMETHEUS_MULTIPROC_DIR": str(work / f"prom-{tag}"),
        }
    )
    return e


def start_engine(env: dict[str, str], work: Path, tag: str, pool: str, concurrency: int) -> Any:
    from worker_harness import start_worker

    from producers.client import Client
    from worker.tasks.runtime import reset_runtime

    worker = start_worker(
        env, work / f"engine-{tag}.log", queues=",".join(ENGINE_QUEUES), concurrency=concurrency, pool=pool
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("CANCELABLE_")})
    from worker.settings import get_settings

    get_settings.cache_clear()
    reset_runtime()
    client = Client()
    deadline = time.monotonic() + 300
    while True:
        if not worker.alive():
            raise RuntimeError(f"engine worker exited:\n{worker.tail()}")
        try:
            if client.ping(timeout=10, engine=True).get("engine_loaded"):
                break
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine worker not ready:\n{worker.tail()}")
        time.sleep(0.5)
    return worker, client


def inprocess_cpu_per_image(env: dict[str, str], photos: list[bytes], jobs: int) -> tuple[float, float]:
    """CPU seconds per image (and wall seconds in all) of ``Engine.enroll_many`` on ``jobs`` one-image subjects,
    batches of ``BATCH``, in this process (same settings, same aligned faces as the system run)."""
    import secrets

    from worker_harness import settings_from_env

    from worker.service.images import decode_image
    from worker.tasks.runtime import load_engine_from_settings

    loaded = load_engine_from_settings(settings_from_env(env))
    engine = loaded.engine
    assert engine.config.max_batch_images == BATCH
    faces = [engine.prepare(decode_image(b, max_bytes=1 << 25, max_pixels=40_000_000)) for b in photos]
    subjects = [(faces[i % len(faces)][None], secrets.token_bytes(32)) for i in range(jobs)]
    engine.enroll_many(subjects[:BATCH])  # warm-up (first-call allocations), not counted
    cpu, wall = time.process_time(), time.perf_counter()
    engine.enroll_many(subjects)
    return (time.process_time() - cpu) / jobs, time.perf_counter() - wall


def bench_batching(env: dict[str, str], svc: Any, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import statistics

    from worker_harness import _faces_dir, jpeg_bytes

    from worker.contracts import JobStatus

    faces_dir = _faces_dir()
    if faces_dir is None:
        print("  skipped: sample faces (../shared/data/faces-smoke/obama-biden) not found")
        return {}
    s3 = svc.client()
    inb = "bench-inputs"
    if inb not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=inb)
    photos = [jpeg_bytes(p) for p in sorted(faces_dir.glob("*.jpg"))]
    refs = []
    for i, body in enumerate(photos):
        s3.put_object(Bucket=inb, Key=f"tenants/acme/batch/{i}.jpg", Body=body)
        refs.append(f"s3://{inb}/tenants/acme/batch/{i}.jpg")
    n = args.batch_jobs
    out: dict[str, Any] = {}

    # (a) in-process engine (nothing else of ours running), the deep queue through the system, in-process again
    # (the worker idle): the ratio is taken against the mean of the two in-process runs, which brackets the machine's
    # drift over the run
    port = int(start_port())
    e_on = engine_env(env, work, args, port, "on")

    def inprocess(when: str) -> float:
        cpu_s, wall_s = inprocess_cpu_per_image(e_on, photos, n)
        print(
            f"  in-process Engine.enroll_many ({when}), {n} one-image subjects, batches of {BATCH}, "
            f"{args.batch_steps} steps: {cpu_s:.3f} CPU s/image ({wall_s:.1f} s wall)",
            flush=True,
        )
        return cpu_s

    base_before = inprocess("before")
    worker, client = start_engine(e_on, work, "on", "threads", ENGINE_THREADS)
    try:
        client.run(client.enroll_job("acme", "deep-warm", [refs[0]], "k1"), timeout=600)  # lazy loads, not counted
        h0 = batch_histogram(port)
        jobs = [client.enroll_job("acme", f"deep{i:03d}", [refs[i % len(refs)]], "k1") for i in range(n)]
        log_start = worker.log.stat().st_size
        cpu0, t0 = cpu_seconds(worker.popen.pid), time.perf_counter()
        client.submit_many(jobs)
        results = [client.wait(j.ref, timeout=3600, poll=0.05) for j in jobs]
        wall, cpu = time.perf_counter() - t0, cpu_seconds(worker.popen.pid) - cpu0
        bad = [r for r in results if r.status != JobStatus.SUCCEEDED]
        if bad:
            raise RuntimeError(f"{len(bad)} deep-queue jobs did not succeed: {bad[0]}")
        h1 = batch_histogram(port)
        h = {k: h1[k] - h0[k] for k in h1}
        mean = h["sum"] / h["count"] if h["count"] else 0.0
        with worker.log.open("rb") as lf:
            lf.seek(log_start)
            engine_cpu = sum(float(m.group(1)) for m in ENGINE_BATCH_LOG.finditer(lf.read().decode(errors="replace")))
        base_cpu = (base_before + inprocess("after, worker idle")) / 2
        out["deep"] = {"cpu_per_image": cpu / n, "ratio": cpu / n / base_cpu, "batch_mean": mean, "wall": wall}
        print(
            f"  system, {n} one-photo enrol jobs queued at once (threads pool, {ENGINE_THREADS} task threads): "
            f"{cpu / n:.3f} CPU s/image in the worker process = {cpu / n / base_cpu:.2f}x in-process (mean of both) "
            f"(engine thread {engine_cpu / n:.3f} = {engine_cpu / n / base_cpu:.2f}x; the rest, download to commit and "
            f"Celery: {(cpu - engine_cpu) / n:.3f}); {wall:.1f} s wall ({n / wall:.2f} images/s); batch-size metric: "
            f"{h['count']:.0f} engine calls, mean {mean:.2f} images (max {BATCH}) = {mean / BATCH:.2f} x "
            "max_batch_images",
            flush=True,
        )

        # (b) lone enrol on the idle worker
        def lone(tag: str, c: Any) -> tuple[float, float]:
            lat, inside = [], []
            c.run(c.enroll_job("acme", f"lone-{tag}-warm", [refs[0]], "k1"), timeout=600)  # lazy loads, not counted
            for i in range(args.lone_runs):
                time.sleep(0.5)  # idle
                job = c.enroll_job("acme", f"lone-{tag}-{i}", [refs[i % len(refs)]], "k1")
                t = time.perf_counter()
                r = c.wait(c.submit(job), timeout=600, poll=0.005)
                lat.append(time.perf_counter() - t)
                if r.status != JobStatus.SUCCEEDED:
                    raise RuntimeError(f"lone job failed: {r}")
                inside.append((r.finished_at - r.started_at).total_seconds())
            return statistics.median(lat), statistics.median(inside)

        log_start = worker.log.stat().st_size
        out["lone_on"] = lone("on", client)
        with worker.log.open("rb") as lf:
            lf.seek(log_start)
            waits = [float(m.group(1)) for m in BATCH_WAIT_LOG.finditer(lf.read().decode(errors="replace"))]
        print(
            f"  lone enrol, batching on: wait in the batcher before its engine call, max of {len(waits)} jobs "
            f"(warm-up included): {max(waits, default=float('nan')):.1f} ms",
            flush=True,
        )
    finally:
        client.close()
        worker.stop()
    for tag, pool, conc, extra in (
        ("off", "threads", ENGINE_THREADS, {"CANCELABLE_ENGINE__MICRO_BATCHING": "false"}),
        ("prefork", "prefork", 1, {}),
    ):
        port = int(start_port())
        e = {**engine_env(env, work, args, port, tag), **extra}
        worker, client = start_engine(e, work, tag, pool, conc)
        try:
            out[f"lone_{tag}"] = lone(tag, client)
        finally:
            client.close()
            worker.stop()
    labels = {
        "on": f"threads pool, micro-batching on (fill timeout {args.fill_timeout_ms} ms, "
        f"mate wait {args.mate_wait_ms} ms)",
        "off": "threads pool, engine.micro_batching=false",
        "prefork": "prefork pool -c 1 (before micro-batching)",
    }
    for tag in ("on", "off", "prefork"):
        lat, inside = out[f"lone_{tag}"]
        print(
            f"  lone enrol on an idle worker, {labels[tag]}: median {lat * 1000:.0f} ms end to end, "
            f"{inside * 1000:.0f} ms in the task (median of {args.lone_runs})",
            flush=True,
        )
    on, off = out["lone_on"][0], out["lone_off"][0]
    print(
        f"  lone enrol, batching on vs off: {on / off:.3f}x (bound: (off + fill timeout) x 1.05 = "
        f"{(off + args.fill_timeout_ms / 1000) * 1.05 * 1000:.0f} ms; measured {on * 1000:.0f} ms)",
        flush=True,
    )
    return out


def start_port() -> int:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


# --- main -------------------------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at start"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_submit":
        _submit_child(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--submit-sizes", default="submit:10000,submit_many:10000,submit_many:100000")
    ap.add_argument("--skip-submit", action="store_true")
    ap.add_argument("--skip-bulk", action="store_true")
    ap.add_argument("--formats", default="jsonl,csv", help="bulk manifest formats to stream")
    ap.add_argument("--skip-revoke", action="store_true")
    ap.add_argument("--revoke-sizes", default="10000,20000", help="subjects under the revoked key, one run each")
    ap.add_argument("--revoke-handover-budget", type=float, default=0.2, help="time budget (s) of the hand-over run")
    ap.add_argument(
        "--revoke-markers-only",
        action="store_true",
        help="seed only the index markers of the subjects under the key (what the index listing reads; no scan run)",
    )
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--batch-jobs", type=int, default=64, help="deep queue: one-photo enrol jobs")
    ap.add_argument("--batch-steps", type=int, default=50, help="optimisation steps of the batching runs")
    ap.add_argument("--bundle", default="lite", help="engine bundle of the batching runs (lite, keymap, a path)")
    ap.add_argument("--lone-runs", type=int, default=5, help="lone enrol jobs per configuration")
    ap.add_argument("--fill-timeout-ms", type=int, default=100, help="engine.batch_fill_timeout_ms")
    ap.add_argument("--mate-wait-ms", type=int, default=5000, help="engine.batch_mate_wait_ms")
    ap.add_argument("--work", type=Path, default=None, help="keep the services' data and the worker logs here")
    args = ap.parse_args()
    print(f"system benchmark: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-system-") as tmp:
        work = Path(tmp) if args.work is None else args.work
        work.mkdir(parents=True, exist_ok=True)
        procs, url, svc = start_services(work)
        try:
            env = service_env(url, svc, work)
            if not args.skip_submit:
                print("enqueue (enroll jobs, fresh producer process each):", flush=True)
                sizes = [(m, int(n)) for m, n in (x.split(":") for x in args.submit_sizes.split(","))]
                bench_submit(env, sizes)
            if not args.skip_bulk:
                print("bulk streaming (real control worker, engine queue drained):", flush=True)
                for fmt in args.formats.split(","):
                    bench_bulk(env, url, svc, work, args.rows, fmt)
            if not args.skip_revoke:
                print("key revocation scheduling (in-process, records seeded directly, chunks left on the queue):")
                os.environ.update({k: v for k, v in env.items() if k.startswith("CANCELABLE_")})
                os.environ.pop("CANCELABLE_WORKER__FANOUT_TIME_BUDGET", None)  # the default budget (half soft limit)
                sizes = [int(x) for x in args.revoke_sizes.split(",")]
                bench_revoke(url, svc, sizes, args.revoke_handover_budget, args.revoke_markers_only)
            if not args.skip_batching:
                print(f"engine micro-batching ({args.bundle} bundle, CPU, 1 torch thread per process):", flush=True)
                bench_batching(env, svc, work, args)
        finally:
            for p in procs:
                if p is not None:
                    p.stop()


if __name__ == "__main__":
    main()
