"""What the service functions need from the process they run in.

``Runtime``: settings, store, job book, keys, the engine and the engine call. ``worker.tasks.runtime.WorkerRuntime``
(per worker process, rebuilt after fork) implements it; so can a test or a script with its own settings, store and
Redis (its ``engine_call`` is then ``EngineCall(self.engine())(job_type, subjects)``).
``Dispatch``: how a fan-out job (revoke, bulk) sends work to other jobs and hands over to a continuation;
``worker.tasks.control_tasks.CeleryDispatch`` implements it with Celery messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from worker.algorithm.engine_base import EngineEnrollment, Subject
    from worker.contracts import BulkJob, EraseJob, RevokeJob
    from worker.keys.providers import KeyProvider
    from worker.service.engine import LoadedEngine
    from worker.settings import Settings
    from worker.storage.client import ObjectStore
    from worker.storage.jobbook import JobBook


class Runtime(Protocol):
    """Settings, the S3 object store, the Redis job book, the key provider and the (lazily loaded) engine."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> ObjectStore: ...

    @property
    def book(self) -> JobBook: ...

    @property
    def keys(self) -> KeyProvider: ...

    def engine(self) -> LoadedEngine:
        """The loaded engine (loaded on first call; engine workers load it at start)."""
        ...

    def engine_call(self, job_type: str, subjects: list[Subject]) -> list[EngineEnrollment]:
        """The engine call (``worker.service.engine.EngineCall`` over ``engine()``) for one job's ``subjects``
        ((faces (N, 3, R, R) in [-1, 1], seed 32 B) each) -> one ``EngineEnrollment`` per subject, in order. A worker
        may run them together with other jobs' subjects (``worker.tasks.batcher``); results do not depend on batch
        mates."""
        ...


class Dispatch(Protocol):
    """The messages a fan-out job sends. Every message carries a deterministic job ID, so sending one twice is
    harmless (the same job runs once, or returns its stored result)."""

    def send_chunk(self, payload: dict[str, Any]) -> None:
        """One re-enrolment chunk (``ReenrollChunk`` JSON) to the engine queue, under its job ID."""
        ...

    def send_enrolls(self, pending: list[tuple[str, dict[str, Any]]]) -> None:
        """A bulk job's enrol children ((child job ID, ``EnrollJob`` JSON), ...) to the engine queue, as one batch."""
        ...

    def engine_queue_depth(self) -> int:
        """Messages waiting on the bulk engine queue (0 when unknown: backpressure is best effort)."""
        ...

    def continue_job(
        self, job: RevokeJob | BulkJob | EraseJob, continuation: int, countdown: float | None = None
    ) -> None:
        """Hand ``job`` over to continuation number ``continuation`` of its task (after ``countdown`` seconds)."""
        ...
