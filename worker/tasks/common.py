"""The envelope every task runs in: parse, replay, count the attempt, run, map errors, retry or dead-letter.

``run_job`` order for one delivery of a job:

1. parse the message with the contracts (JSON dict, exactly one positional argument); anything else -> a ``failed``
   result with ``malformed_job`` (nothing is written, the worker carries on);
2. if the job already finished (its result is in Redis) return that result unchanged (a re-delivered or duplicated
   job returns the existing result; the S3 commit is idempotent per job ID underneath as well);
3. ``INCR`` the attempt counter (at START, so a task that killed its worker process is counted); over
   ``worker.max_attempts`` -> dead-letter record in Redis and S3, result ``dead_lettered``;
4. run the handler; a ``CancelableError`` becomes a ``failed`` result with its code; a *retryable* one (transient
   S3 / Redis / KMS fault) is retried with jittered exponential backoff for ``worker.transient_retry_window``
   seconds from its first transient failure (its attempt given back: attempts count crashes), then dead-lettered;
   any other exception is ``internal_error`` (type name only: its message might carry data);
5. store the terminal result in Redis (``{p}:result:{job_id}``), where producers wait for it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker import metrics
from worker.contracts import ErrorCode, JobError, JobStatus, job_from_wire, to_wire
from worker.errors import CancelableError, DeadLetteredError, MalformedJobError
from worker.tasks.batcher import delivery_attempt

log = logging.getLogger(__name__)

RETRY_BASE_S = 1.0
RETRY_MAX_S = 30.0


def now() -> datetime:
    return datetime.now(UTC)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, CancelableError):
        return bool(exc.retryable)
    try:
        import redis.exceptions as rex

        if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def backoff_s(retries: int) -> float:
    """Exponential backoff with jitter: uniform in [0.5, 1] x min(base * 2**retries, max), so that the retries of
    many jobs hit by one outage do not arrive together when the service comes back."""
    return float(min(RETRY_BASE_S * (2 ** min(retries, 30)), RETRY_MAX_S) * random.uniform(0.5, 1.0))


def parse_payload(
    args: tuple[Any, ...], kwargs: dict[str, Any], kind: str, parser: Callable[[dict[str, Any]], Any] | None = None
) -> Any:
    """The one positional argument of a task -> the validated job of ``kind`` (else ``MalformedJobError``)."""
    if len(args) != 1 or not isinstance(args[0], dict):
        raise MalformedJobError("malformed message: expected exactly one JSON object argument")
    if kwargs:
        raise MalformedJobError(f"malformed message: unexpected keyword arguments {sorted(kwargs)[:5]}")
    job = (parser or job_from_wire)(args[0])
    if job.kind != kind:
        raise MalformedJobError(f"malformed message: a {job.kind} job was sent to the {kind} task")
    return job


def malformed_result(args: tuple[Any, ...], kind: str, err: CancelableError) -> dict[str, Any]:
    """A minimal failed result for a message the contracts rejected (no input values echoed)."""
    job_id = None
    if len(args) == 1 and isinstance(args[0], dict) and isinstance(args[0].get("job_id"), str):
        from worker.contracts import check_job_id

        try:
            job_id = check_job_id(args[0]["job_id"])
        except ValueError:
            job_id = None
    return {
        "schema_version": 1,
        "kind": kind,
        "job_id": job_id,
        "status": JobStatus.FAILED.value,
        "error": JobError.from_exception(err).model_dump(mode="json"),
        "attempts": 1,
    }


def _store_malformed(rt: Any, result: dict[str, Any], task_id: Any) -> dict[str, Any]:
    """Store a malformed message's result under its job ID (else its task ID, when that is a valid job ID), unless
    a result is already stored there: a producer waiting on the ID gets an answer instead of waiting forever."""
    from worker.contracts import check_job_id

    job_id = result.get("job_id")
    if job_id is None and isinstance(task_id, str):
        try:
            job_id = check_job_id(task_id)
        except ValueError:
            job_id = None
    if job_id is not None:
        result = {**result, "job_id": job_id}
        if rt.book.get_result(job_id) is None:
            rt.book.save_result(job_id, result)
    return result


def failed_result(job: Any, result_cls: type, exc: BaseException, attempts: int, started: datetime, **kw: Any) -> Any:
    return result_cls(
        job_id=job.job_id,
        tenant=job.tenant,
        status=JobStatus.FAILED,
        error=JobError.from_exception(exc),
        attempts=attempts,
        started_at=started,
        finished_at=now(),
        **kw,
    )


def dead_letter(rt: Any, job: Any, result_cls: type, attempts: int, code: str, message: str, **kw: Any) -> Any:
    """Record a dead letter (Redis + S3) and build the ``dead_lettered`` result."""
    from worker.storage.deadletters import write_dead_letter
    from worker.storage.records import DeadLetter

    record = DeadLetter(
        job_id=job.job_id,
        job_kind=job.kind,
        tenant=job.tenant,
        attempts=attempts,
        error_code=code,
        message=message[:2000],
        job=to_wire(job),
    )
    uri = None
    try:
        uri = write_dead_letter(rt.store, record)
    except CancelableError as e:  # S3 down: the Redis record still exists
        log.error("dead letter not written to S3 for job %s: %s", job.job_id, e.code)
    rt.book.add_dead_letter(job.job_id, {**record.model_dump(mode="json"), "s3_uri": uri})
    log.warning("job %s dead-lettered after %d attempts (%s)", job.job_id, attempts, code)
    return result_cls(
        job_id=job.job_id,
        tenant=job.tenant,
        status=JobStatus.DEAD_LETTERED,
        error=JobError(
            code=ErrorCode(DeadLetteredError.code), message=f"dead-lettered after {attempts} attempts; last: {code}"
        ),
        attempts=attempts,
        finished_at=now(),
        **kw,
    )


def run_job(
    task: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    kind: str,
    job_type: str,
    result_cls: type,
    handler: Callable[[Any, Any, int, datetime], Any],
    ident: Callable[[Any], dict[str, Any]],
    attempt_key: Callable[[Any], str] | None = None,
    on_terminal: Callable[[Any, Any, Any], None] | None = None,
    parser: Callable[[dict[str, Any]], Any] | None = None,
    result_parser: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Run one delivery of a job (see the module docstring). ``handler(rt, job, attempt, started) -> result``.

    ``ident(job)`` gives the result fields that identify the job (subject, ...); ``attempt_key`` lets a
    continuation (bulk) count attempts separately; ``on_terminal(rt, job, result)`` runs after a terminal result
    was stored (fan-out progress).
    """
    from worker.observability import job_scope
    from worker.tasks.runtime import get_runtime

    rt = get_runtime()
    with metrics.track_job(job_type) as tracker:
        try:
            job = parse_payload(args, kwargs, kind, parser)
        except MalformedJobError as e:
            tracker.outcome, tracker.error_code = "failed", e.code
            log.warning("malformed %s message rejected", kind)
            return _store_malformed(rt, malformed_result(args, kind, e), getattr(task.request, "id", None))

        with job_scope(job.job_id, job_type):
            existing = rt.book.get_result(job.job_id)
            if existing is not None:
                tracker.outcome = "duplicate"
                log.info("job %s already finished (%s): returning the stored result", job.job_id, existing["status"])
                if on_terminal is not None:  # idempotent; covers a crash between storing and reporting
                    from worker.contracts import result_from_wire

                    on_terminal(rt, job, (result_parser or result_from_wire)(existing))
                return existing

            akey = attempt_key(job) if attempt_key else job.job_id
            attempt = rt.book.start_attempt(akey)
            max_attempts = rt.settings.worker.max_attempts
            if attempt > max_attempts:
                last = rt.book.get_fields(job.job_id).get("last_error", "internal_error")
                res = dead_letter(rt, job, result_cls, attempt - 1, last, "attempts exhausted", **ident(job))
                tracker.outcome, tracker.error_code = "dead_lettered", last
                return _finish(rt, job, res, on_terminal)

            started = now()
            try:
                with delivery_attempt(attempt):  # a re-delivered job's engine work runs in a batch of its own
                    res = handler(rt, job, attempt, started)
            except Exception as e:  # noqa: BLE001 - every error becomes a result, a retry or a dead letter
                code = metrics.error_code_of(e)
                if _is_transient(e):
                    rt.book.set_fields(job.job_id, last_error=code)
                    # a transient fault (S3 / Redis / KMS away) is retried with backoff for a time window, not a
                    # number of attempts: a one-minute outage must not dead-letter everything it touches. The
                    # attempt it ended cleanly is given back, so attempts keep counting crashes only.
                    first = rt.book.transient_since(akey)
                    if time.time() - first < rt.settings.worker.transient_retry_window:
                        rt.book.give_back_attempt(akey)
                        tracker.retrying, tracker.error_code = True, code
                        log.warning("job %s transient %s: retrying", job.job_id, code)
                        raise task.retry(exc=e, countdown=backoff_s(task.request.retries), max_retries=None) from e
                    res = dead_letter(rt, job, result_cls, attempt, code, str(e), **ident(job))
                    tracker.outcome, tracker.error_code = "dead_lettered", code
                    return _finish(rt, job, res, on_terminal)
                if not isinstance(e, CancelableError):
                    log.exception("job %s failed with an unexpected %s", job.job_id, type(e).__name__)
                else:
                    log.warning("job %s failed: %s", job.job_id, code)
                res = failed_result(job, result_cls, e, attempt, started, **ident(job))
                tracker.outcome, tracker.error_code = "failed", code
                return _finish(rt, job, res, on_terminal)

            if res.status == JobStatus.FAILED and res.error is not None:
                tracker.outcome, tracker.error_code = "failed", res.error.code.value
            if not JobStatus(res.status).terminal:
                return to_wire(res)  # a fan-out parent: the last chunk stores the terminal result
            return _finish(rt, job, res, on_terminal)


def _finish(rt: Any, job: Any, res: Any, on_terminal: Callable[[Any, Any, Any], None] | None) -> dict[str, Any]:
    """Store the terminal result and report it to a fan-out parent BEFORE the message is acknowledged. If Redis
    cannot take them, the message is rejected with requeue (or, with Redis gone, stays unacknowledged until the
    visibility timeout restores it): the job is delivered again and, being idempotent, stores the same result then.
    Acknowledging it anyway would lose the result and strand its parent."""
    from celery.exceptions import Reject
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    wire = to_wire(res)
    try:
        rt.book.save_result(job.job_id, wire)
        if on_terminal is not None:
            on_terminal(rt, job, res)
    except (RedisConnectionError, RedisTimeoutError) as e:
        log.warning("job %s: result not stored (%s); the message goes back to the queue", job.job_id, type(e).__name__)
        raise Reject("result not stored", requeue=True) from None
    return wire
