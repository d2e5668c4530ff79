"""Every Prometheus metric of the worker fleet, declared once on one explicit registry, and the closed label sets.

Naming: prefix ``cancelable_``, unit suffix (``_seconds``, ``_images``, ``_messages``, ``_bytes``, ``_ratio``,
``_total`` for counters). Labels come from closed sets only (``JOB_TYPES``, ``STAGES``, ``OUTCOMES``,
``ERROR_CODES``, ``QUEUES``, ``PROGRESS_KINDS``, GPU index); a value outside its set raises ``ValueError`` so a
job, subject or key ID can never become a label.

Importing this module imports ``prometheus_client``, which picks in-memory or multi-process values then: a worker
calls ``worker.metrics.multiproc.prepare_multiproc_dir`` before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

from worker import errors
from worker.broker.config import CONTROL_QUEUE, ENGINE_QUEUES

log = logging.getLogger(__name__)

__all__ = [
    "PREFIX",
    "JOB_TYPES",
    "STAGES",
    "JOB_OUTCOMES",
    "IMAGE_OUTCOMES",
    "QUEUES",
    "PROGRESS_KINDS",
    "DEVICE_TYPES",
    "NO_ERROR",
    "MAX_GPUS",
    "ERROR_CODES",
    "check_label",
    "check_error_code",
    "error_code_of",
    "REGISTRY",
    "MULTIPROCESS",
    "STAGE_BUCKETS",
    "JOB_BUCKETS",
    "BATCH_BUCKETS",
    "STEP_BUCKETS",
    "LOAD_BUCKETS",
    "JOBS",
    "IMAGES",
    "STAGE_SECONDS",
    "JOB_SECONDS",
    "OPT_STEPS",
    "OPT_RUN_STEPS",
    "BATCH_IMAGES",
    "IN_FLIGHT",
    "RETRIES",
    "DEAD_LETTERED",
    "FANOUT_ITEMS",
    "MODEL_LOAD_SECONDS",
    "WORKER_PROCESSES",
    "GPU_ALLOCATED",
    "GPU_RESERVED",
    "GPU_TOTAL",
    "GPU_UTILISATION",
]

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


def check_label(value: str, allowed: Iterable[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not in the closed label set {sorted(allowed)}")
    return value


def check_error_code(code: str | None) -> str:
    code = NO_ERROR if code is None else code
    if code not in ERROR_CODES:
        # A class appended to errors.py after this module was imported.
        globals()["ERROR_CODES"] = _error_codes()
    return check_label(code, ERROR_CODES, "error code")


def error_code_of(exc: BaseException) -> str:
    """The wire error code of an exception: ``exc.code`` for ``CancelableError``, else ``internal_error``."""
    code = getattr(exc, "code", None) if isinstance(exc, errors.CancelableError) else None
    if isinstance(code, str):
        with contextlib.suppress(ValueError):
            return check_error_code(code)
    return errors.CancelableError.code


# --- declarations -------------------------------------------------------------------------------------------------
REGISTRY = CollectorRegistry(auto_describe=True)
# prometheus_client chose its value class (in-memory or mmap files) when it was first imported; see
# ``worker.metrics.multiproc.prepare_multiproc_dir``.
MULTIPROCESS: bool = prometheus_client.values.ValueClass is not MutexValue
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not MULTIPROCESS:
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
