"""Per-process state of a worker: settings, Redis, S3, key provider and (engine workers only) the loaded models.

``WorkerRuntime`` is the process's implementation of the service layer's ``worker.service.runtime.Runtime``
protocol; its ``engine_call`` goes through the process's micro-batcher (``worker.tasks.batcher``).
Nothing is created at import. ``get_runtime()`` builds the state on first use in the CURRENT process and rebuilds it
if it finds itself in a forked child (different pid), so sockets, boto3 clients and CUDA contexts are never shared
across ``fork``. The Celery app loads the engine from ``worker_process_init`` in each pool child of an engine
worker; a worker that only consumes the control queue never loads models.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from worker.broker.config import connect_redis, connect_store
from worker.service.engine import EngineCall, LoadedEngine, load_engine_from_settings
from worker.storage.jobbook import JobBook
from worker.tasks.batcher import MicroBatcher
from worker.tasks.inflight import INFLIGHT, current_delivery, expected_submitters

if TYPE_CHECKING:
    from worker.algorithm.engine_base import EngineEnrollment, Subject
    from worker.keys.providers import KeyProvider
    from worker.settings import Settings
    from worker.storage.client import ObjectStore

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Lazily created per-process resources, shared by the task threads of a ``threads`` pool: each is created
    once under a lock (redis-py and boto3 clients are thread-safe once built; building them is not)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._lock = threading.Lock()  # the engine (a load can take minutes; other threads wait for it)
        self._init_lock = threading.RLock()  # the clients (the engine load itself uses ``store``)
        self._redis: Any = None
        self._store: ObjectStore | None = None
        self._keys: KeyProvider | None = None
        self._engine: LoadedEngine | None = None
        self._batcher: MicroBatcher | None = None

    @property
    def redis(self) -> Any:
        """The Redis client of the job book (and of the bulk task's queue-depth check)."""
        if self._redis is None:
            with self._init_lock:
                if self._redis is None:
                    self._redis = connect_redis(self.settings)
        return self._redis

    @property
    def book(self) -> JobBook:
        return JobBook(self.redis)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            with self._init_lock:
                if self._store is None:
                    self._store = connect_store(self.settings)
        return self._store

    @property
    def keys(self) -> KeyProvider:
        if self._keys is None:
            from worker.keys.providers import make_key_provider

            with self._init_lock:
                if self._keys is None:
                    self._keys = make_key_provider(self.settings, self.store)
        return self._keys

    def engine(self) -> LoadedEngine:
        with self._lock:
            if self._engine is None:
                self._engine = load_engine_from_settings(self.settings, self.store)
            return self._engine

    def batcher(self) -> MicroBatcher:
        """This process's micro-batcher over ``EngineCall(self.engine())`` (created on first use)."""
        loaded = self.engine()
        with self._lock:
            if self._batcher is None:
                call = EngineCall(loaded)
                s = self.settings.engine
                self._batcher = MicroBatcher(
                    call,
                    max_images=call.max_images,
                    fill_timeout_s=float(s.batch_fill_timeout_ms) / 1000.0,
                    mate_wait_s=float(s.batch_mate_wait_ms) / 1000.0,
                    # images that run one by one gain nothing from a batch: background work goes a subject at a time
                    background_max_images=1 if loaded.engine.images_independent else None,
                    expected=lambda: expected_submitters(self.redis),
                    merge=bool(s.micro_batching),
                )
                INFLIGHT.listen(self._batcher.wakeup)
            return self._batcher

    def engine_call(self, job_type: str, subjects: list[Subject]) -> list[EngineEnrollment]:
        """Through this process's micro-batcher: with the threads pool, several jobs' subjects run as one engine
        call; a lone job or a prefork child runs at once; a re-delivered job's subjects run alone."""
        b = self.batcher()
        attempt, background = current_delivery()
        INFLIGHT.submitting()
        try:
            return b.submit(job_type, subjects, alone=attempt > 1, background=background)
        finally:
            INFLIGHT.resumed()

    def batch_running_since(self) -> float | None:
        """When the engine batch now running started (None: none, or no batcher yet): for the watchdog."""
        b = self._batcher
        return b.running_since() if b is not None else None

    def close(self) -> None:
        """Stop the batcher's engine thread once its pending submissions have run."""
        b = self._batcher
        if b is not None:
            INFLIGHT.unlisten(b.wakeup)
            b.close()

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # the prefork parent's metrics thread may hold the lock at the moment of a fork (progress collector)
    global _runtime_lock
    _runtime_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def get_runtime() -> WorkerRuntime:
    """This process's runtime (created on first use, once even when task threads race; a forked child gets a
    fresh one)."""
    global _runtime
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            from worker.settings import get_settings

            _runtime = WorkerRuntime(get_settings())
        return _runtime


def reset_runtime() -> None:
    """Forget the runtime (tests, and a child right after fork; a runtime of this process stops its batcher)."""
    global _runtime
    rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close()


def engine_batch_started() -> float | None:
    """When the engine batch this process runs now started (None: none): the watchdog's second source."""
    rt = _runtime
    return rt.batch_running_since() if rt is not None and rt.pid == os.getpid() else None
