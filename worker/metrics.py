"""Every Prometheus metric of the worker fleet, declared once on one explicit registry.

Naming: prefix ``cancelable_``, unit suffix (``_seconds``, ``_images``, ``_messages``, ``_bytes``, ``_ratio``,
``_total`` for counters). Labels come from closed sets only (``JOB_TYPES``, ``STAGES``, ``OUTCOMES``,
``ERROR_CODES``, ``QUEUES``, ``PROGRESS_KINDS``, GPU index); a value outside its set raises ``ValueError`` so a
job, subject or key ID can never become a label.

Multi-process (Celery prefork): set ``PROMETHEUS_MULTIPROC_DIR`` in the environment *before* the worker starts
(Procfile, compose, k8s do). ``install_celery_hooks(app, port=...)`` then cleans stale files in the main
process, serves the merged view of every child from the main process, and marks children dead when they exit.
Without the variable (``--pool solo``, one process per GPU, tests) the registry is served directly.

Task-side helpers: ``track_job``, ``stage_timer``, ``job_finished``, ``images_processed``, ``batch_size``,
``optimisation_steps``, ``task_retried``, ``fanout_items``, ``model_load_timer``, ``update_gpu_metrics``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from worker.broker.config import CONTROL_QUEUE, ENGINE_QUEUES

# prometheus_client picks its value class (in-memory or mmap files) when it is first imported, so the
# multiprocess directory has to exist before that import.
# ``CANCELABLE_METRICS__MULTIPROC_DIR`` (worker.settings) is honoured the same way when the launcher set only it.
_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("CANCELABLE_METRICS__MULTIPROC_DIR")
if _MULTIPROC_DIR and "prometheus_client" not in sys.modules:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _MULTIPROC_DIR
if _MULTIPROC_DIR:
    os.makedirs(_MULTIPROC_DIR, exist_ok=True)

import prometheus_client  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.values import MutexValue  # noqa: E402

from worker import errors  # noqa: E402

log = logging.getLogger(__name__)

# ``*_created`` series double the series count and no dashboard uses them.
prometheus_client.disable_created_metrics()

PREFIX = "cancelable"

# --- closed label sets --------------------------------------------------------------------------------------------
JOB_TYPES: tuple[str, ...] = ("enroll", "verify", "revoke", "reenroll", "bulk", "erase")
STAGES: tuple[str, ...] = (
    "download",
    "decode",
    "align",
    "optimise",  # the engine call: encode, mix, optimise, decode and embed (one batched call)
    "template",
    "upload",
    "key",
)
JOB_OUTCOMES: tuple[str, ...] = ("succeeded", "failed", "dead_lettered", "duplicate")
IMAGE_OUTCOMES: tuple[str, ...] = ("succeeded", "failed")
QUEUES: tuple[str, ...] = (*ENGINE_QUEUES, CONTROL_QUEUE)
PROGRESS_KINDS: tuple[str, ...] = ("revoke", "bulk")
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")
NO_ERROR = "none"
MAX_GPUS = 64


def _error_codes() -> frozenset[str]:
    """Every ``code`` of the ``worker.errors`` hierarchy (and ``ErrorCode`` if the contracts define more)."""
    codes = {NO_ERROR, errors.CancelableError.code}
    stack: list[type[errors.CancelableError]] = [errors.CancelableError]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            codes.add(sub.code)
            stack.append(sub)
    contracts = sys.modules.get("worker.contracts")
    enum = getattr(contracts, "ErrorCode", None) if contracts is not None else None
    if enum is not None:
        codes.update(str(getattr(m, "value", m)) for m in enum)
    return frozenset(codes)


ERROR_CODES: frozenset[str] = _error_codes()


def _check(value: str, allowed: Iterable[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not in the closed label set {sorted(allowed)}")
    return value


def _check_error_code(code: str | None) -> str:
    code = NO_ERROR if code is None else code
    if code not in ERROR_CODES:
        # A class appended to errors.py after this module was imported.
        globals()["ERROR_CODES"] = _error_codes()
    return _check(code, ERROR_CODES, "error code")


def error_code_of(exc: BaseException) -> str:
    """The wire error code of an exception: ``exc.code`` for ``CancelableError``, else ``internal_error``."""
    code = getattr(exc, "code", None) if isinstance(exc, errors.CancelableError) else None
    if isinstance(code, str):
        with contextlib.suppress(ValueError):
            return _check_error_code(code)
    return errors.CancelableError.code


# --- declarations -------------------------------------------------------------------------------------------------
REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROCESS: bool = prometheus_client.values.ValueClass is not MutexValue
if _MULTIPROC_DIR and not MULTIPROCESS:
    log.warning("PROMETHEUS_MULTIPROC_DIR set after prometheus_client was imported: metrics stay per-process")

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_BUCKETS = (10, 25, 50, 100, 200, 300, 500, 1000, 2000, 5000)
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

JOBS = Counter(
    f"{PREFIX}_jobs",
    "Jobs finished, by job type, outcome and error code (error_code='none' on success).",
    ["job_type", "outcome", "error_code"],
    registry=REGISTRY,
)
IMAGES = Counter(
    f"{PREFIX}_images",
    "Input images processed, by job type, outcome and error code. rate() gives images per second.",
    ["job_type", "outcome", "error_code"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    f"{PREFIX}_stage_duration_seconds",
    "Wall time of one pipeline stage execution.",
    ["stage", "job_type"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    f"{PREFIX}_job_duration_seconds",
    "Wall time of one job attempt, from task start to end.",
    ["job_type"],
    buckets=JOB_BUCKETS,
    registry=REGISTRY,
)
OPT_STEPS = Counter(
    f"{PREFIX}_optimisation_steps",
    "Optimisation (Adam) steps run by the engine.",
    ["job_type"],
    registry=REGISTRY,
)
OPT_RUN_STEPS = Histogram(
    f"{PREFIX}_optimisation_run_steps",
    "Steps taken by one batched optimisation run (early stop makes it vary).",
    ["job_type"],
    buckets=STEP_BUCKETS,
    registry=REGISTRY,
)
BATCH_IMAGES = Histogram(
    f"{PREFIX}_batch_size_images",
    "Faces in one batched engine call.",
    ["job_type"],
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_jobs_in_flight",
    "Jobs currently executing in live worker processes.",
    ["job_type"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
RETRIES = Counter(
    f"{PREFIX}_task_retries",
    "Task retries scheduled after a transient error (the cause is in logs and Sentry, tagged with the code).",
    ["job_type"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    f"{PREFIX}_jobs_dead_lettered",
    "Jobs moved to the dead-letter store (too many attempts or a worker-killing job); the cause code is on "
    "cancelable_jobs_total{outcome='dead_lettered'}.",
    ["job_type"],
    registry=REGISTRY,
)
FANOUT_ITEMS = Counter(
    f"{PREFIX}_fanout_items",
    "Items of a revocation or bulk fan-out completed (idempotent counters advanced), by outcome.",
    ["kind", "outcome"],
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Histogram(
    f"{PREFIX}_model_load_duration_seconds",
    "Time to load and verify the model bundle in one worker process.",
    ["device_type"],
    buckets=LOAD_BUCKETS,
    registry=REGISTRY,
)
WORKER_PROCESSES = Gauge(
    f"{PREFIX}_worker_processes",
    "Live worker processes with models loaded, by device type.",
    ["device_type"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
GPU_ALLOCATED = Gauge(
    f"{PREFIX}_gpu_memory_allocated_bytes",
    "CUDA memory held by tensors (torch.cuda.memory_allocated), summed over live processes per GPU.",
    ["gpu"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
GPU_RESERVED = Gauge(
    f"{PREFIX}_gpu_memory_reserved_bytes",
    "CUDA memory reserved by the caching allocator (torch.cuda.memory_reserved), summed per GPU.",
    ["gpu"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
GPU_TOTAL = Gauge(
    f"{PREFIX}_gpu_memory_total_bytes",
    "Total memory of the GPU.",
    ["gpu"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
GPU_UTILISATION = Gauge(
    f"{PREFIX}_gpu_utilisation_ratio",
    "GPU busy fraction over the driver's last sample period (0..1; needs NVML).",
    ["gpu"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)


# Series that alerts take increase() of exist from the start at 0: a counter first seen at 1 shows no increase.
for _jt in JOB_TYPES:
    JOBS.labels(_jt, "succeeded", NO_ERROR)
    DEAD_LETTERED.labels(_jt)
    RETRIES.labels(_jt)
for _kind in PROGRESS_KINDS:
    for _outcome in IMAGE_OUTCOMES:
        FANOUT_ITEMS.labels(_kind, _outcome)


# --- task-side helpers --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stage_timer(stage: str, job_type: str) -> Iterator[None]:
    """Time one execution of ``stage`` (observed also when the stage raises)."""
    child = STAGE_SECONDS.labels(_check(stage, STAGES, "stage"), _check(job_type, JOB_TYPES, "job type"))
    start = time.perf_counter()
    try:
        yield
    finally:
        child.observe(time.perf_counter() - start)


def job_finished(job_type: str, outcome: str, error_code: str | None = None) -> None:
    """Count one finished job. ``dead_lettered`` also counts in ``cancelable_jobs_dead_lettered_total``."""
    _check(job_type, JOB_TYPES, "job type")
    _check(outcome, JOB_OUTCOMES, "outcome")
    code = _check_error_code(error_code)
    if outcome in ("succeeded", "duplicate") and code != NO_ERROR:
        raise ValueError(f"outcome {outcome!r} takes no error code (got {code!r})")
    if outcome in ("failed", "dead_lettered") and code == NO_ERROR:
        code = errors.CancelableError.code
    JOBS.labels(job_type, outcome, code).inc()
    if outcome == "dead_lettered":
        DEAD_LETTERED.labels(job_type).inc()


def images_processed(n: int, outcome: str, job_type: str = "enroll", error_code: str | None = None) -> None:
    """Count ``n`` input images that were processed (``succeeded``) or rejected (``failed`` + error code)."""
    if n < 0:
        raise ValueError(f"image count must be >= 0, got {n}")
    _check(outcome, IMAGE_OUTCOMES, "image outcome")
    code = _check_error_code(error_code)
    if outcome == "failed" and code == NO_ERROR:
        code = errors.CancelableError.code
    if outcome == "succeeded":
        code = NO_ERROR
    IMAGES.labels(_check(job_type, JOB_TYPES, "job type"), outcome, code).inc(n)


def batch_size(job_type: str, n: int) -> None:
    """Observe the number of faces in one batched engine call."""
    BATCH_IMAGES.labels(_check(job_type, JOB_TYPES, "job type")).observe(n)


def optimisation_steps(job_type: str, steps: int) -> None:
    """Record one optimisation run of ``steps`` steps."""
    _check(job_type, JOB_TYPES, "job type")
    OPT_STEPS.labels(job_type).inc(steps)
    OPT_RUN_STEPS.labels(job_type).observe(steps)


def task_retried(job_type: str, error_code: str | None = None) -> None:
    """Count one retry scheduled for a transient error (``error_code`` is validated and logged, not a label)."""
    code = _check_error_code(error_code or errors.CancelableError.code)
    RETRIES.labels(_check(job_type, JOB_TYPES, "job type")).inc()
    log.info("retry scheduled: job_type=%s error_code=%s", job_type, code)


def fanout_items(kind: str, n: int = 1, outcome: str = "succeeded") -> None:
    """Advance the revocation / bulk fan-out item counter (call when the idempotent counter really moved)."""
    FANOUT_ITEMS.labels(_check(kind, PROGRESS_KINDS, "progress kind"), _check(outcome, IMAGE_OUTCOMES, "outcome")).inc(
        n
    )


@contextlib.contextmanager
def model_load_timer(device_type: str) -> Iterator[None]:
    """Time the bundle load of one process; on success this process counts as a live worker process."""
    _check(device_type, DEVICE_TYPES, "device type")
    start = time.perf_counter()
    yield
    MODEL_LOAD_SECONDS.labels(device_type).observe(time.perf_counter() - start)
    WORKER_PROCESSES.labels(device_type).set(1)


class JobTracker:
    """Handle yielded by ``track_job``; set ``outcome`` to ``duplicate`` or ``dead_lettered`` when that happened."""

    def __init__(self, job_type: str) -> None:
        self.job_type = job_type
        self.outcome = "succeeded"
        self.error_code: str | None = None
        self.retrying = False


@contextlib.contextmanager
def track_job(job_type: str) -> Iterator[JobTracker]:
    """Wrap one task attempt: in-flight gauge, job duration, and the job counter by outcome.

    A ``CancelableError`` counts as ``failed`` with its code, any other exception as ``failed`` /
    ``internal_error``. Celery's ``Retry`` (``self.retry(...)`` inside the block), or an exception raised with
    ``tracker.retrying = True`` set (autoretry), counts a retry instead of a finished job. Setting
    ``tracker.outcome`` (``duplicate``, ``dead_lettered``, ``failed`` + ``tracker.error_code``) overrides the
    outcome of a block that returns normally. The exception is re-raised unchanged.
    """
    _check(job_type, JOB_TYPES, "job type")
    tracker = JobTracker(job_type)
    gauge = IN_FLIGHT.labels(job_type)
    gauge.inc()
    start = time.perf_counter()
    try:
        yield tracker
    except BaseException as exc:
        if tracker.retrying or (type(exc).__name__ == "Retry" and type(exc).__module__.startswith("celery")):
            task_retried(job_type, tracker.error_code or _retry_code(exc))
        elif tracker.outcome == "dead_lettered":
            job_finished(job_type, "dead_lettered", tracker.error_code or error_code_of(exc))
        else:
            job_finished(job_type, "failed", error_code_of(exc))
        raise
    else:
        job_finished(job_type, tracker.outcome, tracker.error_code)
    finally:
        JOB_SECONDS.labels(job_type).observe(time.perf_counter() - start)
        gauge.dec()
        update_gpu_metrics()


def _retry_code(exc: BaseException) -> str:
    cause = getattr(exc, "exc", None) or exc.__cause__ or exc.__context__
    return error_code_of(cause if isinstance(cause, BaseException) else exc)


def update_gpu_metrics() -> None:
    """Sample CUDA memory (and NVML utilisation when available) of this process; no-op without CUDA.

    torch is never imported here: if the process has not imported it, or never initialised CUDA, nothing happens.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    for idx in range(min(torch.cuda.device_count(), MAX_GPUS)):
        gpu = str(idx)
        GPU_ALLOCATED.labels(gpu).set(torch.cuda.memory_allocated(idx))
        GPU_RESERVED.labels(gpu).set(torch.cuda.memory_reserved(idx))
        with contextlib.suppress(Exception):
            GPU_TOTAL.labels(gpu).set(torch.cuda.get_device_properties(idx).total_memory)
        with contextlib.suppress(Exception):  # torch.cuda.utilization needs pynvml
            GPU_UTILISATION.labels(gpu).set(torch.cuda.utilization(idx) / 100.0)


# --- fleet collectors (read Redis at scrape time) -------------------------------------------------------------------
SENT_AT_HEADER = "sent_at"


def stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish`` receiver: stamp the publish time so the queue collector can age the oldest message."""
    if headers is not None and SENT_AT_HEADER not in headers:
        headers[SENT_AT_HEADER] = time.time()


# kombu's Redis transport keeps one list per priority step: "<queue>" and "<queue>\x06\x16<n>".
_PRIORITY_SEP = "\x06\x16"


class QueueCollector:
    """Queue depth and oldest-message age of the Celery queues in Redis, read at scrape time.

    kombu LPUSHes and BRPOPs, so the oldest message is the list's last element. Its age comes from the
    ``sent_at`` header (``stamp_sent_at``); a message without it is aged from when this collector first saw it.
    """

    def __init__(self, redis_client: Any, queues: Iterable[str] = QUEUES, clock: Callable[[], float] = time.time):
        self._redis = redis_client
        self._queues = tuple(_check(q, QUEUES, "queue") for q in queues)
        self._clock = clock
        self._first_seen: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _lists(self, queue: str) -> list[str]:
        names = [queue]
        names += [f"{queue}{_PRIORITY_SEP}{p}" for p in range(1, 10)]
        return names

    def _oldest_age(self, name: str, raw: bytes | str | None, now: float) -> float:
        if raw is None:
            self._first_seen.pop(name, None)
            return 0.0
        try:
            msg = json.loads(raw)
            headers = msg.get("headers") or {}
            sent = headers.get(SENT_AT_HEADER)
            ident = str(headers.get("id") or msg.get("properties", {}).get("delivery_tag") or hash(raw))
        except (ValueError, AttributeError):
            sent, ident = None, str(hash(raw))
        if isinstance(sent, int | float) and sent > 0:
            return max(0.0, now - float(sent))
        seen = self._first_seen.get(name)
        if seen is None or seen[0] != ident:
            seen = (ident, now)
            self._first_seen[name] = seen
        return max(0.0, now - seen[1])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        length = GaugeMetricFamily(
            f"{PREFIX}_queue_length_messages",
            "Messages waiting in the Celery queue (not yet delivered).",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_message_age_seconds",
            "Age of the oldest waiting message (0 when the queue is empty).",
            labels=["queue"],
        )
        up = GaugeMetricFamily(f"{PREFIX}_redis_up", "1 when the broker answered the last queue scrape.")
        now = self._clock()
        try:
            with self._lock:
                for queue in self._queues:
                    lists = self._lists(queue)
                    pipe = self._redis.pipeline(transaction=False)
                    for name in lists:
                        pipe.llen(name)
                    for name in lists:
                        pipe.lindex(name, -1)
                    res = pipe.execute()
                    lens, tails = res[: len(lists)], res[len(lists) :]
                    oldest = max(self._oldest_age(name, t, now) for name, t in zip(lists, tails, strict=True))
                    length.add_metric([queue], float(sum(int(n) for n in lens)))
                    age.add_metric([queue], oldest)
        except Exception as exc:  # broker down: report it, never break the scrape
            log.warning("queue metrics: broker unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield length
        yield age
        yield up


@dataclass(frozen=True)
class ProgressSnapshot:
    """Progress of one open revocation or bulk job (counts only; the job ID never leaves the source).

    ``done`` counts every finished item, succeeded or failed; ``failed`` is the failed part of ``done``.
    """

    kind: str
    done: int
    total: int
    failed: int = 0


ProgressSource = Callable[[], Iterable[ProgressSnapshot]]


def open_job_snapshots(book: Any) -> list[ProgressSnapshot]:
    """Progress of every open revoke/bulk job in ``book`` (a ``worker.storage.jobbook.JobBook``), for the metrics
    collector (counts only, no IDs leave)."""
    out = []
    for job_id in book.open_jobs():
        p = book.progress(job_id)
        if p.kind in ("revoke", "bulk"):
            out.append(ProgressSnapshot(kind=p.kind, done=p.done, total=p.total or 0, failed=p.failed))
    return out


class ProgressCollector:
    """Done/total items summed over all open revocation and bulk jobs, per kind; no job IDs in labels."""

    def __init__(self, source: ProgressSource):
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        open_jobs = GaugeMetricFamily(f"{PREFIX}_progress_open_jobs", "Open revocation / bulk jobs.", labels=["kind"])
        done = GaugeMetricFamily(
            f"{PREFIX}_progress_done_items",
            "Items finished (succeeded or failed), summed over open jobs.",
            labels=["kind"],
        )
        failed = GaugeMetricFamily(
            f"{PREFIX}_progress_failed_items", "Items failed (part of done), summed over open jobs.", labels=["kind"]
        )
        total = GaugeMetricFamily(
            f"{PREFIX}_progress_total_items", "Items expected, summed over open jobs.", labels=["kind"]
        )
        agg = {k: [0, 0, 0, 0] for k in PROGRESS_KINDS}
        try:
            for snap in self._source():
                row = agg[_check(snap.kind, PROGRESS_KINDS, "progress kind")]
                row[0] += 1
                row[1] += int(snap.done)
                row[2] += int(snap.failed)
                row[3] += int(snap.total)
        except Exception as exc:
            log.warning("progress metrics: source failed (%s)", type(exc).__name__)
            return
        for kind, (n, d, f, t) in agg.items():
            open_jobs.add_metric([kind], n)
            done.add_metric([kind], d)
            failed.add_metric([kind], f)
            total.add_metric([kind], t)
        yield from (open_jobs, done, failed, total)


# --- serving ------------------------------------------------------------------------------------------------------
_DB_PID = re.compile(r"_(\d+)\.db$")


def multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") if MULTIPROCESS else None


def cleanup_multiproc_dir(keep_pid: int | None = None) -> int:
    """Delete metric files of other processes (stale runs). Call once in the main process before forking.

    Files of ``keep_pid`` (default: this process) stay, because this process has them open.
    """
    path = multiproc_dir()
    if not path:
        return 0
    keep = os.getpid() if keep_pid is None else keep_pid
    removed = 0
    for f in glob.glob(os.path.join(path, "*.db")):
        m = _DB_PID.search(f)
        if m and int(m.group(1)) != keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LiveMultiProcessCollector(multiprocess.MultiProcessCollector):
    """MultiProcessCollector that first drops live-gauge files of processes that died without a shutdown signal
    (SIGKILL, OOM), so a killed child's in-flight jobs and GPU memory do not linger."""

    def collect(self):  # type: ignore[override]
        for f in glob.glob(os.path.join(self._path, "gauge_live*.db")):
            m = _DB_PID.search(f)
            if m and not _pid_alive(int(m.group(1))):
                multiprocess.mark_process_dead(int(m.group(1)), self._path)
        return super().collect()


def build_registry(redis_client: Any = None, progress_source: ProgressSource | None = None) -> CollectorRegistry:
    """The registry to serve: all worker metrics (merged across processes when multi-process) plus, when given,
    the queue collector on ``redis_client`` and the progress collector on ``progress_source``."""
    path = multiproc_dir()
    if path:
        registry = CollectorRegistry()
        _LiveMultiProcessCollector(registry, path=path)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    if redis_client is not None:
        registry.register(QueueCollector(redis_client))
    if progress_source is not None:
        registry.register(ProgressCollector(progress_source))
    return registry


class _Forward:
    """Serves the module registry inside another registry without re-registering its metrics."""

    def __init__(self, inner: CollectorRegistry):
        self._inner = inner

    def collect(self):
        return self._inner.collect()


def make_wsgi_app(redis_client: Any = None, progress_source: ProgressSource | None = None) -> Callable:
    """WSGI app serving ``/metrics`` (and any path) for embedding in another server."""
    return prometheus_client.make_wsgi_app(build_registry(redis_client, progress_source))


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", redis_client: Any = None, progress_source: ProgressSource | None = None
) -> tuple[Any, threading.Thread]:
    """Serve metrics on ``addr:port`` from a daemon thread; returns ``(server, thread)``; ``server.shutdown()``
    stops it. ``port=0`` picks a free port (``server.server_port``)."""
    server, thread = prometheus_client.start_http_server(
        port, addr=addr, registry=build_registry(redis_client, progress_source)
    )
    log.info("metrics served on %s:%d (multiprocess=%s)", addr, server.server_port, bool(multiproc_dir()))
    return server, thread


# --- Celery wiring ------------------------------------------------------------------------------------------------
_server: list[Any] = []


def install_celery_hooks(
    app: Any = None,
    *,
    port: int | None,
    addr: str = "0.0.0.0",
    redis_url: str | None = None,
    progress_source: ProgressSource | None = None,
) -> None:
    """Connect the metrics lifecycle to Celery's signals. Call once where the Celery app is built.

    - ``worker_init`` (main process, before the pool forks): delete stale multiprocess files, start the server
      on ``port`` (``None``: serve nothing, e.g. producers). ``redis_url`` adds queue depth/age; pass it on the
      control worker only (fleet-wide values; dashboards take ``max``), likewise ``progress_source``.
    - ``worker_process_shutdown`` (each pool child on exit): ``multiprocess.mark_process_dead(pid)``.
    - ``worker_shutdown`` (main): stop the server.
    - ``before_task_publish``: stamp ``sent_at`` on messages this process publishes (fan-out chunks).
    """
    from celery import signals

    def _on_worker_init(**_: Any) -> None:
        removed = cleanup_multiproc_dir()
        if removed:
            log.info("removed %d stale metric files", removed)
        if port is None:
            return
        client = None
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        _server.append(start_metrics_server(port, addr=addr, redis_client=client, progress_source=progress_source))

    def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
        path = multiproc_dir()
        if path:
            multiprocess.mark_process_dead(pid or os.getpid(), path)

    def _on_worker_shutdown(**_: Any) -> None:
        while _server:
            server, _thread = _server.pop()
            server.shutdown()
            server.server_close()

    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.before_task_publish.connect(stamp_sent_at, weak=False)
