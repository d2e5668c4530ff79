"""Task-side recording helpers: what a job attempt, a pipeline stage, a batch, a fan-out item or a model load adds to
the metrics of ``worker.metrics.definitions`` (every label checked against its closed set).

``track_job``, ``stage_timer``, ``job_finished``, ``images_processed``, ``batch_size``, ``optimisation_steps``,
``task_retried``, ``fanout_items``, ``model_load_timer``, ``update_gpu_metrics``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from worker import errors
from worker.metrics.definitions import (
    BATCH_IMAGES,
    DEAD_LETTERED,
    DEVICE_TYPES,
    FANOUT_ITEMS,
    GPU_ALLOCATED,
    GPU_RESERVED,
    GPU_TOTAL,
    GPU_UTILISATION,
    IMAGE_OUTCOMES,
    IMAGES,
    IN_FLIGHT,
    JOB_OUTCOMES,
    JOB_SECONDS,
    JOB_TYPES,
    JOBS,
    MAX_GPUS,
    MODEL_LOAD_SECONDS,
    NO_ERROR,
    OPT_RUN_STEPS,
    OPT_STEPS,
    PROGRESS_KINDS,
    RETRIES,
    STAGE_SECONDS,
    STAGES,
    WORKER_PROCESSES,
    check_error_code,
    check_label,
    error_code_of,
)

log = logging.getLogger(__name__)

__all__ = [
    "JobTracker",
    "batch_size",
    "fanout_items",
    "images_processed",
    "job_finished",
    "model_load_timer",
    "optimisation_steps",
    "stage_timer",
    "task_retried",
    "track_job",
    "update_gpu_metrics",
]


@contextlib.contextmanager
def stage_timer(stage: str, job_type: str) -> Iterator[None]:
    """Time one execution of ``stage`` (observed also when the stage raises)."""
    child = STAGE_SECONDS.labels(check_label(stage, STAGES, "stage"), check_label(job_type, JOB_TYPES, "job type"))
    start = time.perf_counter()
    try:
        yield
    finally:
        child.observe(time.perf_counter() - start)


def job_finished(job_type: str, outcome: str, error_code: str | None = None) -> None:
    """Count one finished job. ``dead_lettered`` also counts in ``cancelable_jobs_dead_lettered_total``."""
    check_label(job_type, JOB_TYPES, "job type")
    check_label(outcome, JOB_OUTCOMES, "outcome")
    code = check_error_code(error_code)
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
    check_label(outcome, IMAGE_OUTCOMES, "image outcome")
    code = check_error_code(error_code)
    if outcome == "failed" and code == NO_ERROR:
        code = errors.CancelableError.code
    if outcome == "succeeded":
        code = NO_ERROR
    IMAGES.labels(check_label(job_type, JOB_TYPES, "job type"), outcome, code).inc(n)


def batch_size(job_type: str, n: int) -> None:
    """Observe the number of faces in one batched engine call."""
    BATCH_IMAGES.labels(check_label(job_type, JOB_TYPES, "job type")).observe(n)


def optimisation_steps(job_type: str, steps: int) -> None:
    """Record one optimisation run of ``steps`` steps."""
    check_label(job_type, JOB_TYPES, "job type")
    OPT_STEPS.labels(job_type).inc(steps)
    OPT_RUN_STEPS.labels(job_type).observe(steps)


def task_retried(job_type: str, error_code: str | None = None) -> None:
    """Count one retry scheduled for a transient error (``error_code`` is validated and logged, not a label)."""
    code = check_error_code(error_code or errors.CancelableError.code)
    RETRIES.labels(check_label(job_type, JOB_TYPES, "job type")).inc()
    log.info("retry scheduled: job_type=%s error_code=%s", job_type, code)


def fanout_items(kind: str, n: int = 1, outcome: str = "succeeded") -> None:
    """Advance the revocation / bulk fan-out item counter (call when the idempotent counter really moved)."""
    FANOUT_ITEMS.labels(
        check_label(kind, PROGRESS_KINDS, "progress kind"), check_label(outcome, IMAGE_OUTCOMES, "outcome")
    ).inc(n)


@contextlib.contextmanager
def model_load_timer(device_type: str) -> Iterator[None]:
    """Time the bundle load of one process; on success this process counts as a live worker process."""
    check_label(device_type, DEVICE_TYPES, "device type")
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
    check_label(job_type, JOB_TYPES, "job type")
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
