"""What the service functions need from the process they run in.

``Runtime``: settings, store, job book, keys, engine. ``worker.tasks.runtime.Runtime`` (per worker process, rebuilt
after fork) implements it; so can a test or a script with its own settings, store and Redis.
``Dispatch``: how a fan-out job (revoke, bulk) sends work to other jobs and hands over to a continuation;
``worker.tasks.control_tasks.CeleryDispatch`` implements it with Celery messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

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

    def run_engine(self, loaded: LoadedEngine, items: list[tuple[torch.Tensor, bytes]], job_type: str) -> list[Any]:
        """One engine call for ``items`` ((faces (N, 3, R, R), seed) per subject) -> one ``EnrollResult`` per subject,
        in order. A worker may run them together with other jobs' subjects (``worker.tasks.batcher``); results do
        not depend on batch mates. ``worker.service.enrol.run_engine`` is the engine call itself."""
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
