"""``JobTask``: the Celery task base class every job task derives from, and the envelope it runs a job in.

A job task says what it takes and gives as class attributes (``job_model``, ``result_model``, ``job_type``) and
what it does as hooks (``handle``, ``ident``, ``attempt_key``, ``reports_terminal`` / ``on_terminal``, ``parse``,
``parse_result``); its ``run`` reads the message's extra keyword arguments into a ``Delivery`` and calls
``run_job``. The business logic is in ``worker.service``; a ``handle`` only calls it.

``run_job`` order for one delivery of a job:

1. parse the message with the contracts (JSON dict, exactly one positional argument); anything else -> a ``failed``
   result with ``malformed_job`` (nothing is written, the worker carries on);
2. if the job already finished (its result is in Redis) return that result unchanged (a re-delivered or duplicated
   job returns the existing result; the S3 commit is idempotent per job ID underneath as well). Everything in Redis
   is keyed by the job's reference ``{tenant}/{job_id}``: a job ID is unique only within its tenant, so another
   tenant's job with the same ID is a different job and never sees this one's result;
3. ``INCR`` the attempt counter (at START, so a task that killed its worker process is counted); over
   ``worker.max_attempts`` -> dead-letter record in Redis and S3, result ``dead_lettered``;
4. run ``handle``; a ``CancelableError`` becomes a ``failed`` result with its code; a *retryable* one (transient
   S3 / Redis / KMS fault) is retried with jittered exponential backoff for ``worker.transient_retry_window``
   seconds from its first transient failure (its attempt given back: attempts count crashes), then dead-lettered;
   any other exception is ``internal_error`` (type name only: its message might carry data);
5. store the terminal result in Redis (``{p}:result:{tenant}/{job_id}``), where producers wait for it, and run
   ``on_terminal`` (fan-out progress), both before the message is acknowledged.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from worker import metrics
from worker.contracts import (
    ErrorCode,
    JobError,
    JobStatus,
    check_job_id,
    check_name,
    job_from_wire,
    job_ref,
    parse_job_ref,
    result_from_wire,
    to_wire,
)
from worker.errors import CancelableError, DeadLetteredError, MalformedJobError
from worker.service.clock import now
from worker.tasks.base import GuardedTask
from worker.tasks.batcher import delivery_attempt

if TYPE_CHECKING:
    from worker.service.runtime import Runtime

log = logging.getLogger(__name__)

RETRY_BASE_S = 1.0
RETRY_MAX_S = 30.0


class JobLike(Protocol):
    """What the envelope reads of any job message (the contracts' jobs and ``ReenrollChunk``)."""

    @property
    def job_id(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def kind(self) -> str: ...


class ResultLike(Protocol):
    """What the envelope builds and reads of any result model (the contracts' results and ``ChunkResult``)."""

    def __init__(self, **fields: Any) -> None: ...

    @property
    def status(self) -> JobStatus: ...

    @property
    def error(self) -> JobError | None: ...


JobT = TypeVar("JobT", bound=JobLike)
ResultT = TypeVar("ResultT", bound=ResultLike)


@dataclass(frozen=True)
class Delivery:
    """What a message carried besides its job: the bulk job an enrolment belongs to, the number of a continuation
    (a revoke listing or a bulk stream handed over to a fresh task)."""

    parent: str | None = None
    continuation: int = 0


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


def readable_ref(job: Any, task_id: Any) -> tuple[str, str] | None:
    """``(tenant, job_id)`` of a message that is not a valid job, when they can be read: the job argument's own
    ``tenant`` and ``job_id`` when both are valid, else the task ID when it is a job reference (``tenant/job_id``,
    what producers send). None when neither names a job."""
    if isinstance(job, dict):
        try:
            return check_name(job.get("tenant"), "tenant"), check_job_id(job.get("job_id"))  # type: ignore[arg-type]
        except ValueError:
            pass
    try:
        return parse_job_ref(task_id)
    except ValueError:
        return None


def malformed_result(kind: str, err: CancelableError, ident: tuple[str, str] | None) -> dict[str, Any]:
    """A minimal failed result for a message the contracts rejected (no input values echoed)."""
    return {
        "schema_version": 1,
        "kind": kind,
        "job_id": ident[1] if ident else None,
        "tenant": ident[0] if ident else None,
        "status": JobStatus.FAILED.value,
        "error": JobError.from_exception(err).model_dump(mode="json"),
        "attempts": 1,
    }


def store_refused(book: Any, ident: tuple[str, str], result: dict[str, Any]) -> None:
    """Store a refused message's result under its job reference unless one is stored there already (a finished job
    keeps its result): a producer waiting on the job gets an answer instead of waiting forever."""
    ref = job_ref(*ident)
    if book.get_result(ref) is None:
        book.save_result(ref, result)


class JobTask(GuardedTask, Generic[JobT, ResultT]):  # type: ignore[misc]
    """Base class of the job tasks (enroll, verify, reenroll_chunk, revoke, bulk); see the module docstring.

    Subclasses set ``name`` (the task name: the wire contract), ``job_model``, ``result_model`` and ``job_type``
    (the metrics label) and implement ``handle``; they are registered with ``app.register_task``.
    """

    job_model: type[JobT]
    result_model: type[ResultT]
    job_type: str

    # --- hooks ------------------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The ``kind`` a message to this task must carry."""
        return str(self.job_model.model_fields["kind"].default)  # type: ignore[attr-defined]

    def parse(self, data: dict[str, Any]) -> JobT:
        """The message's job (``MalformedJobError`` when the contracts reject it)."""
        job: JobT = job_from_wire(data)
        return job

    def parse_result(self, data: dict[str, Any]) -> ResultT:
        """A stored result of this task, for ``on_terminal`` on a re-delivery."""
        result: ResultT = result_from_wire(data)
        return result

    def handle(self, rt: Runtime, job: JobT, attempt: int, started: datetime, delivery: Delivery) -> ResultT:
        """Do the job; return its result (terminal, or ``running`` for a fan-out parent)."""
        raise NotImplementedError

    def ident(self, job: JobT) -> dict[str, Any]:
        """The result fields that identify the job besides ``job_id`` and ``tenant`` (subject, ...)."""
        return {}

    def attempt_key(self, job: JobT, delivery: Delivery) -> str:
        """Under which key attempts are counted: the job reference (a continuation counts its own)."""
        return job_ref(job.tenant, job.job_id)

    def reports_terminal(self, delivery: Delivery) -> bool:
        """Whether ``on_terminal`` has anything to do for this delivery (a stored result is only parsed then)."""
        return False

    def is_background(self, delivery: Delivery) -> bool:
        """Whether this delivery is background work (its engine work yields to interactive work): a bulk job's
        child, or anything taken from the bulk engine queue."""
        from worker.broker.config import ENGINE_BULK_QUEUE

        info = getattr(self.request, "delivery_info", None) or {}
        return bool(delivery.parent) or info.get("routing_key") == ENGINE_BULK_QUEUE

    def on_terminal(self, rt: Runtime, job: JobT, result: ResultT, delivery: Delivery) -> None:
        """After a terminal result was stored (and again on a re-delivery): report to a fan-out parent."""

    def after_stored(self, rt: Runtime, job: JobT, result: ResultT) -> None:
        """Right after the terminal result was stored (an enrolment checks that no erasure overtook it)."""

    def runtime(self) -> Runtime:
        from worker.tasks.runtime import get_runtime

        return get_runtime()

    # --- the envelope -----------------------------------------------------------------------------------------------
    def parse_message(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> JobT:
        """The one positional argument of the message -> the validated job (else ``MalformedJobError``)."""
        if len(args) != 1 or not isinstance(args[0], dict):
            raise MalformedJobError("malformed message: expected exactly one JSON object argument")
        if kwargs:
            raise MalformedJobError(f"malformed message: unexpected keyword arguments {sorted(kwargs)[:5]}")
        job = self.parse(args[0])
        if job.kind != self.kind:
            raise MalformedJobError(f"malformed message: a {job.kind} job was sent to the {self.kind} task")
        return job

    def failed_result(self, job: JobT, exc: BaseException, attempts: int, started: datetime) -> ResultT:
        return self.result_model(
            job_id=job.job_id,
            tenant=job.tenant,
            status=JobStatus.FAILED,
            error=JobError.from_exception(exc),
            attempts=attempts,
            started_at=started,
            finished_at=now(),
            **self.ident(job),
        )

    def dead_letter(self, rt: Runtime, job: JobT, attempts: int, code: str, message: str) -> ResultT:
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
        rt.book.add_dead_letter(job_ref(job.tenant, job.job_id), {**record.model_dump(mode="json"), "s3_uri": uri})
        log.error("job %s dead-lettered after %d attempts (%s)", job.job_id, attempts, code)
        return self.result_model(
            job_id=job.job_id,
            tenant=job.tenant,
            status=JobStatus.DEAD_LETTERED,
            error=JobError(
                code=ErrorCode(DeadLetteredError.code), message=f"dead-lettered after {attempts} attempts; last: {code}"
            ),
            attempts=attempts,
            finished_at=now(),
            **self.ident(job),
        )

    def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A job message (``job_model`` JSON) -> ``result_model`` JSON."""
        return self.run_job(args, kwargs, Delivery())

    def run_job(self, args: tuple[Any, ...], kwargs: dict[str, Any], delivery: Delivery) -> dict[str, Any]:
        """Run one delivery of a job (see the module docstring)."""
        from worker.observability import job_scope

        rt = self.runtime()
        with metrics.track_job(self.job_type) as tracker:
            try:
                job = self.parse_message(args, kwargs)
            except MalformedJobError as e:
                tracker.outcome, tracker.error_code = "failed", e.code
                log.warning("malformed %s message rejected", self.kind)
                ident = readable_ref(args[0] if len(args) == 1 else None, getattr(self.request, "id", None))
                result = malformed_result(self.kind, e, ident)
                if ident is not None:
                    store_refused(rt.book, ident, result)
                return result

            ref = job_ref(job.tenant, job.job_id)
            with job_scope(job.job_id, self.job_type, getattr(job, "tenant", None)):
                existing = rt.book.get_result(ref)
                if existing is not None:
                    tracker.outcome = "duplicate"
                    log.info(
                        "job %s already finished (%s): returning the stored result", job.job_id, existing["status"]
                    )
                    if self.reports_terminal(delivery):  # idempotent; covers a crash between storing and reporting
                        self.on_terminal(rt, job, self.parse_result(existing), delivery)
                    return existing

                akey = self.attempt_key(job, delivery)
                attempt = rt.book.start_attempt(akey)
                max_attempts = rt.settings.worker.max_attempts
                if attempt > max_attempts:
                    last = rt.book.get_fields(ref).get("last_error", "internal_error")
                    res = self.dead_letter(rt, job, attempt - 1, last, "attempts exhausted")
                    tracker.outcome, tracker.error_code = "dead_lettered", last
                    return self._finish(rt, job, res, delivery)

                started = now()
                t0 = time.perf_counter()
                log.info("job %s started (attempt %d)", job.job_id, attempt)
                try:
                    # a re-delivered job's engine work runs in a batch of its own; background work yields
                    with delivery_attempt(attempt, background=self.is_background(delivery)):
                        res = self.handle(rt, job, attempt, started, delivery)
                except Exception as e:  # every error becomes a result, a retry or a dead letter
                    code = metrics.error_code_of(e)
                    if _is_transient(e):
                        rt.book.set_fields(ref, last_error=code)
                        # a transient fault (S3 / Redis / KMS away) is retried with backoff for a time window, not a
                        # number of attempts: a one-minute outage must not dead-letter everything it touches. The
                        # attempt it ended cleanly is given back, so attempts keep counting crashes only.
                        first = rt.book.transient_since(akey)
                        if time.time() - first < rt.settings.worker.transient_retry_window:
                            rt.book.give_back_attempt(akey)
                            tracker.retrying, tracker.error_code = True, code
                            log.warning("job %s transient %s: retrying", job.job_id, code)
                            raise self.retry(exc=e, countdown=backoff_s(self.request.retries), max_retries=None) from e
                        res = self.dead_letter(rt, job, attempt, code, str(e))
                        tracker.outcome, tracker.error_code = "dead_lettered", code
                        return self._finish(rt, job, res, delivery)
                    took = time.perf_counter() - t0
                    if not isinstance(e, CancelableError):
                        log.exception(
                            "job %s failed: %s (unexpected %s) after %.2f s", job.job_id, code, type(e).__name__, took
                        )
                    else:
                        log.warning("job %s failed: %s after %.2f s", job.job_id, code, took)
                    res = self.failed_result(job, e, attempt, started)
                    tracker.outcome, tracker.error_code = "failed", code
                    return self._finish(rt, job, res, delivery)

                if res.status == JobStatus.FAILED and res.error is not None:
                    tracker.outcome, tracker.error_code = "failed", res.error.code.value
                _log_outcome(job.job_id, res, time.perf_counter() - t0)
                if not JobStatus(res.status).terminal:
                    return to_wire(res)  # a fan-out parent: the last chunk stores the terminal result
                return self._finish(rt, job, res, delivery)

    def _finish(self, rt: Runtime, job: JobT, res: ResultT, delivery: Delivery) -> dict[str, Any]:
        """Store the terminal result and report it to a fan-out parent BEFORE the message is acknowledged. If Redis
        cannot take them, the message is rejected with requeue (or, with Redis gone, stays unacknowledged until the
        visibility timeout restores it): the job is delivered again and, being idempotent, stores the same result
        then. Acknowledging it anyway would lose the result and strand its parent."""
        from celery.exceptions import Reject
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        wire = to_wire(res)
        try:
            rt.book.save_result(job_ref(job.tenant, job.job_id), wire)
            self.after_stored(rt, job, res)
            if self.reports_terminal(delivery):
                self.on_terminal(rt, job, res, delivery)
        except (RedisConnectionError, RedisTimeoutError) as e:
            log.warning(
                "job %s: result not stored (%s); the message goes back to the queue", job.job_id, type(e).__name__
            )
            raise Reject("result not stored", requeue=True) from None
        return wire


def _log_outcome(job_id: str, res: Any, took: float) -> None:
    """The one line of a job's outcome: INFO when it succeeded (or a fan-out parent started its children), WARNING
    with the error code when it failed. Never the result itself (it can name subjects and storage paths)."""
    status = JobStatus(res.status)
    if status == JobStatus.SUCCEEDED:
        decision = getattr(res, "decision", None)
        extra = f", {decision.value if hasattr(decision, 'value') else decision}" if decision else ""
        log.info("job %s succeeded in %.2f s%s", job_id, took, extra)
    elif not status.terminal:
        log.info("job %s %s: fan-out under way after %.2f s", job_id, status.value, took)
    else:
        code = res.error.code.value if res.error is not None else "-"
        log.warning("job %s %s: %s after %.2f s", job_id, status.value, code, took)
