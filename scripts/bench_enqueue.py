"""Benchmark (not a test) of the enqueue rate of ``Client.submit_many``; needs only a Redis.

Starts a private ``redis-server`` on a free port (no persistence; or ``--redis-url`` to use one you have: its database
is flushed), then, each in a fresh process:

submit_many
    ``--runs`` (3) times: ``Client.submit_many`` of ``--jobs`` (100,000) one-image enrol jobs, given as a generator of
    wire dicts (validated, rendered and pushed by the client, the submit markers written). Prints the median jobs/s
    (wall clock), the median jobs per second of the producer's own CPU time (what the producer costs whatever else
    runs on the machine: wall-clock figures also depend on the load average, printed before and after, and on the
    Redis server's CPU) and the producer's peak RSS (the largest of the runs).

LPUSH (reference)
    As many strings of the mean size of the queued messages, made in the loop (one per job) and pushed with redis-py's
    pipelined ``LPUSH`` in batches of ``--batch``: what Redis and the client library allow with no job to build.

Run: .venv/bin/python scripts/bench_enqueue.py [--jobs 100000] [--runs 3] [--batch 500] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "engine.interactive"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of our own on a free port (no persistence), stopped at the end; yields its URL."""
    import redis

    binary = os.environ.get("CANCELABLE_REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server, or pass --redis-url)")
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as d:
        for _ in range(3):
            port = _free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            with open(Path(d) / "redis.log", "wb") as log:
                proc = subprocess.Popen([*argv, "--dir", d], stdout=log, stderr=subprocess.STDOUT)
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if redis.Redis.from_url(url, socket_timeout=1).ping():
                        break
                except redis.RedisError:
                    time.sleep(0.1)
            if proc.poll() is None:
                try:
                    yield url
                finally:
                    proc.terminate()
                    proc.wait(10)
                return
        raise SystemExit(f"could not start redis-server; log:\n{(Path(d) / 'redis.log').read_text()[-2000:]}")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jobs(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {
            "kind": "enroll",
            "job_id": f"bench-{i:09d}",
            "tenant": "acme",
            "subject": f"s{i:09d}",
            "images": [f"s3://bench-inputs/tenants/acme/{i:09d}.jpg"],
            "key_id": "k1",
        }


def child_submit(url: str, n: int, batch: int) -> dict[str, Any]:
    from producers.client import Client
    from worker.settings import load_settings

    client = Client(load_settings(redis={"url": url}, metrics={"enabled": False}))
    r = client.redis
    r.flushdb()
    client.app.connection_for_write().ensure_connection()
    t0, c0 = time.perf_counter(), time.process_time()
    ids = client.submit_many(_jobs(n), batch=batch)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    queued = int(r.llen(QUEUE))
    sample = r.lrange(QUEUE, 0, 99)
    out = {
        "jobs": n,
        "returned": len(ids),
        "queued": queued,
        "seconds": dt,
        "jobs_per_s": n / dt,
        "jobs_per_cpu_s": n / cpu,
        "rss_mb": _peak_rss_mb(),
        "item_bytes": sum(map(len, sample)) / max(len(sample), 1),
    }
    r.flushdb()
    client.close()
    return out


def child_lpush(url: str, n: int, batch: int, size: int) -> dict[str, Any]:
    import redis

    r = redis.Redis.from_url(url)
    r.flushdb()
    pad = "x" * max(size - 9, 0)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        pipe = r.pipeline(transaction=False)
        pipe.lpush(QUEUE, *(f"{i:09d}{pad}" for i in range(start, min(start + batch, n))))
        pipe.execute()
    dt = time.perf_counter() - t0
    queued = int(r.llen(QUEUE))
    r.flushdb()
    return {"jobs": n, "queued": queued, "seconds": dt, "jobs_per_s": n / dt, "rss_mb": _peak_rss_mb()}


def _run_child(*argv: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [sys.executable, __file__, "_child", *argv], env=env, capture_output=True, text=True, check=False
    )
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{p.stderr[-3000:]}")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def bench(url: str, n: int, runs: int, batch: int) -> None:
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({os.cpu_count()} CPUs)")
    results = []
    for i in range(runs):
        r = _run_child("submit", url, str(n), str(batch))
        if r["queued"] != n or r["returned"] != n:
            raise SystemExit(f"run {i + 1}: {r['queued']} queued, {r['returned']} returned, {n} expected")
        results.append(r)
        print(
            f"  submit_many run {i + 1}: {r['jobs_per_s']:>8.0f} jobs/s ({r['seconds']:.2f} s; producer CPU "
            f"{r['jobs_per_cpu_s']:.0f} jobs per CPU second), peak RSS {r['rss_mb']:.0f} MB"
        )
    size = round(statistics.mean(r["item_bytes"] for r in results))
    ref = [_run_child("lpush", url, str(n), str(batch), str(size)) for _ in range(runs)]
    med = statistics.median(r["jobs_per_s"] for r in results)
    print(
        f"submit_many  {n} enrol jobs, batch {batch}: {med:.0f} jobs/s (median of {runs}; producer CPU "
        f"{statistics.median(r['jobs_per_cpu_s'] for r in results):.0f} jobs per CPU second), "
        f"peak RSS {max(r['rss_mb'] for r in results):.0f} MB, {size} B per message"
    )
    print(
        f"LPUSH        {n} items of {size} B, pipelined {batch} at a time: "
        f"{statistics.median(r['jobs_per_s'] for r in ref):.0f} items/s (median of {runs}), "
        f"peak RSS {max(r['rss_mb'] for r in ref):.0f} MB"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        mode, url, n, batch, *rest = sys.argv[2:]
        if mode == "submit":
            out = child_submit(url, int(n), int(batch))
        else:
            out = child_lpush(url, int(n), int(batch), int(rest[0]))
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=500, help="jobs per Redis round trip (submit_many's batch)")
    ap.add_argument("--redis-url", help="use this Redis (its database is flushed) instead of starting one")
    a = ap.parse_args()
    if a.redis_url:
        bench(a.redis_url, a.jobs, a.runs, a.batch)
    else:
        with private_redis() as url:
            bench(url, a.jobs, a.runs, a.batch)


if __name__ == "__main__":
    main()
