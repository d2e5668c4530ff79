"""Capacity model of a fleet (not a test): how long a bulk enrolment or a key revocation takes, how deep the queue
gets, how much Redis memory and how many S3 requests per second it costs.

model
    One prediction for a fleet and a job: ``--workers``, ``--images-per-s`` (one engine worker at full batches, what
    ``scripts/bench_engine.py`` prints), ``--subjects``, ``--photos`` per subject, ``--kind bulk|revoke``. Prints the
    time to finish, the bottleneck, the deepest engine queue, Redis memory and S3 requests per second.
table
    The table in docs/performance.md: 1k, 100k and 1M subjects on 1, 10 and 100 GPU workers, both job kinds.
validate
    A real small run on this machine: private Redis and SeaweedFS (the integration tests' helpers), the lite bundle
    on the CPU, one engine worker (threads pool, 16 task threads) and one control worker. Measures the engine's
    images/s in-process (before and after), the wall time of an enrol job and the serial per-subject time of a
    re-enrolment chunk before and after their engine calls, Redis bytes per queued message and per finished subject,
    and the S3 requests of one enrolment and one re-enrolment (counted on the boto3 client's events); then a bulk job
    with no engine worker (the backpressure window: nothing more is sent while it is full), a bulk enrolment of
    ``--subjects`` one-photo subjects and a key revocation of them, each timed from submit; prints predicted vs
    measured, with the engine rate taken in-process and from the worker's own engine calls (its batch log lines).

How the model works (the mechanisms it follows are in ``worker/service/bulk.py`` and ``worker/service/revoke.py``):

- Engine rate: a worker runs ``images_per_s`` at full batches (its 16 task threads download and align the next
  batch while one runs), so the fleet enrols ``workers * images_per_s / photos`` subjects per second.
- Bulk: the control task streams the manifest at ``stream_rows_per_s`` and sends ``chunk_size`` children per Redis
  round trip. After each chunk it pauses ``BULK_PAUSE_S`` (a continuation with a countdown) while the bulk engine
  queue (``LLEN``: messages not yet taken by a worker; each worker holds up to ``concurrency`` more) is deeper than
  ``BULK_MAX_QUEUE_DEPTH_CHUNKS * chunk_size``; a continuation looks at the queue before it sends and pauses again
  while it is still deep. Simulated as a fluid, one event per chunk sent or pause.
- Revoke: the control task lists the key's subjects at ``list_subjects_per_s`` and sends ``revoke_chunk_size``
  subjects per message; it pauses ``REVOKE_PAUSE_S`` while more than ``revoke_window * chunk``
  (``worker.revoke_max_queued_chunks``) of its
  subjects are unfinished, so at most 9 chunks are ever in flight. One chunk is one task: it prepares its subjects
  one after the other (``prep_s_per_subject``: key bump, fence, download, decode, detect, align), runs them as one
  engine call (queued behind other chunks on the same worker's engine), then commits and marks old versions revoked
  one subject after the other (``commit_s_per_subject``). Simulated chunk by chunk; chunks go to the worker whose
  engine is free first (the best case: Redis hands a message to whichever worker asks first).
- Redis: peak = deepest queue * bytes per queued message + subjects * bytes per finished subject (the job book keeps
  results, attempts and per-subject records for 30 days). S3: per-subject request counts (per photo where it
  scales with photos) * subjects / time to finish; the peak rate is at the engine-bound rate.

The defaults describe a GPU host (20 images/s is an assumption, not a measurement); the per-subject counts and bytes
are what ``validate`` measured. Pass the figures measured on the deployment.

Run: PYTHONPATH=. .venv/bin/python scripts/capacity.py model --workers 10 --images-per-s 40 --subjects 100000
     PYTHONPATH=. .venv/bin/python scripts/capacity.py table [--images-per-s 40]
     PYTHONPATH=. .venv/bin/python scripts/capacity.py validate [--subjects 32] [--steps 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.service.bulk import BULK_MAX_QUEUE_DEPTH_CHUNKS, BULK_PAUSE_S  # noqa: E402
from worker.service.revoke import REVOKE_PAUSE_S  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

REVOKE_MAX_QUEUED_CHUNKS = WorkerSettings.model_fields["revoke_max_queued_chunks"].default

# S3 API calls per subject, counted by ``validate`` on the boto3 client's events (one enrolment of a subject with
# ``photos`` photos; one re-enrolment of such a subject inside a chunk): {operation: (fixed, per photo)}
ENROLL_S3: dict[str, tuple[float, float]] = {
    "GetObject": (13.0, 1.0),
    "PutObject": (7.0, 1.0),
}
REENROLL_S3: dict[str, tuple[float, float]] = {
    "GetObject": (17.0, 1.0),
    "PutObject": (8.0, 1.0),
    "ListObjectsV2": (1.0, 0.0),
}


@dataclass
class Fleet:
    """Engine workers and the control side. Rates are per engine worker process (one per GPU)."""

    workers: int = 1
    images_per_s: float = 20.0  # one worker at full batches (scripts/bench_engine.py); 20: an assumed GPU figure
    batch_images: int = 8  # engine.batch_size (max_batch_images)
    concurrency: int = 16  # task threads per engine worker = messages it holds besides the queue
    enrol_prep_s: float = 0.1  # one enrol job before its engine call: key record, download, decode, detect, align
    enrol_commit_s: float = 0.05  # one enrol job after its engine call: PNGs, commit, result
    prep_parallel: int = 8  # enrol jobs a worker host prepares at once (its CPU cores beside the engine)
    prep_s_per_subject: float = 0.15  # serial, inside a re-enrolment chunk: key bump, fence, download, align
    commit_s_per_subject: float = 0.1  # serial, inside a chunk: commit, pointer, old versions revoked
    stream_rows_per_s: float = 15_000.0  # bulk manifest streaming, one control task (bench_system.py)
    list_subjects_per_s: float = 2_000.0  # key subject index listing, one control task (bench_system.py)
    continuation_s: float = 0.05  # start cost of a continuation task (ranged GET / LIST from the cursor)
    fanout_budget_s: float = 81.0  # worker.fanout_time_budget: a continuation after this long
    bulk_chunk: int = 64  # BulkJob.chunk_size default
    revoke_chunk: int = 50  # worker.revoke_chunk_size
    revoke_window: int = REVOKE_MAX_QUEUED_CHUNKS  # worker.revoke_max_queued_chunks
    message_bytes: float = 1_300.0  # Redis memory per queued enrol message on the bulk queue (validate)
    chunk_message_bytes: float = 2_000.0  # per queued re-enrolment chunk message (50 subject names more)
    book_bytes_per_subject: float = 1_350.0  # Redis memory kept per enrolled subject (30-day job book TTL; validate)
    revoke_book_bytes_per_subject: float = 600.0  # Redis memory kept per re-enrolled subject (validate)


@dataclass
class Job:
    subjects: int
    photos: int = 1
    kind: str = "bulk"  # bulk | revoke


@dataclass
class Prediction:
    seconds: float
    bottleneck: str
    max_queue_messages: int
    redis_bytes: float
    s3_requests: dict[str, float]  # total per operation
    s3_peak_rps: float
    pauses: int = 0
    continuations: int = 0
    notes: list[str] = field(default_factory=list)
    fanout_seconds: float = 0.0  # when the control task has sent the last message

    @property
    def s3_mean_rps(self) -> float:
        return sum(self.s3_requests.values()) / self.seconds if self.seconds > 0 else 0.0


def s3_per_subject(kind: str, photos: int) -> dict[str, float]:
    table = ENROLL_S3 if kind == "bulk" else REENROLL_S3
    return {op: fixed + per * photos for op, (fixed, per) in table.items()}


def predict(fleet: Fleet, job: Job) -> Prediction:
    if job.subjects < 1 or fleet.workers < 1 or fleet.images_per_s <= 0:
        raise ValueError("subjects, workers and images/s must be positive")
    pred = _bulk(fleet, job) if job.kind == "bulk" else _revoke(fleet, job)
    per = s3_per_subject(job.kind, job.photos)
    pred.s3_requests = {op: n * job.subjects for op, n in per.items()}
    if job.kind == "bulk":
        peak_subjects_per_s = min(fleet.workers * fleet.images_per_s / job.photos, fleet.stream_rows_per_s)
    else:
        peak_subjects_per_s = job.subjects / pred.seconds
    pred.s3_peak_rps = sum(per.values()) * peak_subjects_per_s
    return pred


def _bulk(f: Fleet, job: Job) -> Prediction:
    """Fluid simulation: one event per chunk sent by the control task (or pause)."""
    # subjects/s the engines finish while there is work; the host's CPUs must prepare and commit as fast
    per_worker = min(f.images_per_s / job.photos, f.prep_parallel / (f.enrol_prep_s + f.enrol_commit_s))
    rate = f.workers * per_worker
    held = f.workers * f.concurrency  # messages taken by workers (not on the Redis list)
    window = BULK_MAX_QUEUE_DEPTH_CHUNKS * f.bulk_chunk
    t = f.continuation_s
    task_start = t
    sent, done = 0, 0.0
    maxq = pauses = conts = 0

    def advance(dt: float) -> None:
        nonlocal t, done
        done = min(float(sent), done + rate * dt)
        t += dt

    while sent < job.subjects:
        n = min(f.bulk_chunk, job.subjects - sent)
        advance(n / f.stream_rows_per_s)
        sent += n
        depth = max(0, int(sent - done) - held)
        maxq = max(maxq, depth)
        if sent >= job.subjects:
            break
        if depth > window:  # backpressure: continuations wait (and send nothing) until the queue is back in the window
            excess = sent - held - window - done  # what the workers must take before a continuation sends again
            n_pauses = max(1, math.ceil(excess / (rate * (BULK_PAUSE_S + f.continuation_s)))) if rate > 0 else 1
            advance(n_pauses * (BULK_PAUSE_S + f.continuation_s))
            pauses += n_pauses
            task_start = t
        elif t - task_start > f.fanout_budget_s:
            advance(f.continuation_s)
            conts += 1
            task_start = t
    fanout_end = t
    advance((sent - done) / rate)
    # pipeline fill and drain: the first batch waits for its jobs' preparation, the last batch's jobs commit after it
    first = min(f.batch_images, math.ceil(job.subjects / f.workers))
    par = min(first, f.prep_parallel)
    fill = first * f.enrol_prep_s / par
    t += fill + first * f.enrol_commit_s / par
    if job.subjects / rate < 0.8 * t:
        bottleneck = "fan-out (backpressure pauses)" if pauses else "pipeline fill and drain (a small job)"
    elif per_worker < f.images_per_s / job.photos:
        bottleneck = "host CPU preparing and committing jobs"
    else:
        bottleneck = "engine"
    if pauses == 0 and fanout_end >= 0.8 * t:
        bottleneck = "manifest streaming"
    redis = maxq * f.message_bytes + job.subjects * f.book_bytes_per_subject
    return Prediction(t, bottleneck, maxq, redis, {}, 0.0, pauses, conts, [], fanout_end)


def _revoke(f: Fleet, job: Job) -> Prediction:
    """Discrete simulation, chunk by chunk (see the module docstring)."""
    c = f.revoke_chunk
    window = f.revoke_window * c
    engine_free = [(0.0, w) for w in range(f.workers)]  # heap: (time the worker's engine is free, worker)
    heapq.heapify(engine_free)
    finishing: list[tuple[float, int]] = []  # heap: (finish time, subjects) of chunks in flight
    t = f.continuation_s
    listed = unfinished = pauses = 0
    fanout_end = 0.0
    max_inflight = 0
    last = 0.0

    def retire(now: float) -> None:
        nonlocal unfinished
        while finishing and finishing[0][0] <= now:
            unfinished -= heapq.heappop(finishing)[1]

    while listed < job.subjects:
        n = min(c, job.subjects - listed)
        t += n / f.list_subjects_per_s
        retire(t)
        free_at, w = heapq.heappop(engine_free)
        prep_end = t + n * f.prep_s_per_subject
        eng_end = max(prep_end, free_at) + n * job.photos / f.images_per_s
        heapq.heappush(engine_free, (eng_end, w))
        fin = eng_end + n * f.commit_s_per_subject
        heapq.heappush(finishing, (fin, n))
        last = max(last, fin)
        unfinished += n
        listed += n
        max_inflight = max(max_inflight, len(finishing))
        fanout_end = t
        while listed < job.subjects and unfinished > window:  # paused; the continuation checks again
            t += REVOKE_PAUSE_S + f.continuation_s
            pauses += 1
            retire(t)
    engine_only = job.subjects * job.photos / (f.workers * f.images_per_s)
    if engine_only >= 0.8 * last:
        bottleneck = "engine"
    elif job.subjects / f.list_subjects_per_s >= 0.8 * last:
        bottleneck = "listing"
    else:
        bottleneck = f"re-enrolment chunks (serial work per chunk; at most {f.revoke_window + 1} in flight)"
    maxq = min(max_inflight, math.ceil(job.subjects / c))
    redis = maxq * f.chunk_message_bytes + job.subjects * f.revoke_book_bytes_per_subject
    notes = [f"{max_inflight} chunks in flight at most"]
    return Prediction(last, bottleneck, maxq, redis, {}, 0.0, pauses, 0, notes, fanout_end)


# --- output -----------------------------------------------------------------------------------------------------------
def human_s(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def human_bytes(b: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return f"{b / k:.1f} {unit}"
    return f"{b:.0f} B"


def describe(fleet: Fleet, job: Job, p: Prediction) -> str:
    ops = ", ".join(f"{op} {n / p.seconds:.1f}/s" for op, n in p.s3_requests.items() if n)
    return (
        f"{job.kind} of {job.subjects} subjects x {job.photos} photo(s) on {fleet.workers} worker(s) at "
        f"{fleet.images_per_s:g} images/s each: {human_s(p.seconds)} ({p.seconds:.1f} s); bottleneck: {p.bottleneck}; "
        f"deepest engine queue {p.max_queue_messages} messages; {p.pauses} backpressure pauses; Redis "
        f"{human_bytes(p.redis_bytes)}; S3 mean {p.s3_mean_rps:.0f} requests/s ({ops}), peak {p.s3_peak_rps:.0f}/s"
        + (f"; {'; '.join(p.notes)}" if p.notes else "")
    )


def table(fleet: Fleet, photos: int) -> str:
    rows = [
        "| job | subjects | 1 worker | 10 workers | 100 workers |",
        "|---|---|---|---|---|",
    ]
    for kind in ("bulk", "revoke"):
        for n in (1_000, 100_000, 1_000_000):
            cells = []
            for w in (1, 10, 100):
                p = predict(replace(fleet, workers=w), Job(n, photos, kind))
                limit = "" if p.bottleneck == "engine" else " *"
                cells.append(f"{human_s(p.seconds)}{limit}")
            rows.append(f"| {kind} | {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def fleet_from_args(a: argparse.Namespace) -> Fleet:
    f = Fleet()
    for name in vars(f):
        v = getattr(a, name, None)
        if v is not None:
            setattr(f, name, v)
    return f


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    for name, value in vars(Fleet()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")


# --- validation on this machine (real services, real workers) ---------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="one prediction")
    add_fleet_args(m)
    m.add_argument("--subjects", type=int, required=True)
    m.add_argument("--photos", type=int, default=1)
    m.add_argument("--kind", choices=["bulk", "revoke"], default="bulk")
    t = sub.add_parser("table", help="the docs table: 1k/100k/1M subjects on 1/10/100 workers")
    add_fleet_args(t)
    t.add_argument("--photos", type=int, default=1)
    v = sub.add_parser("validate", help="a real small run on this machine, predicted vs measured")
    v.add_argument("--subjects", type=int, default=32)
    v.add_argument("--steps", type=int, default=20)
    v.add_argument("--bundle", default="lite")
    v.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "model":
        f = fleet_from_args(a)
        job = Job(a.subjects, a.photos, a.kind)
        print(describe(f, job, predict(f, job)))
    elif a.cmd == "table":
        print(table(fleet_from_args(a), a.photos))
    else:
        from capacity_validate import validate  # heavy (services, torch): only for this command

        return validate(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
