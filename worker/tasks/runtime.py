"""Per-process state of a worker: settings, Redis, S3, key provider and (engine workers only) the loaded models.

``Runtime`` is the process's implementation of the service layer's ``worker.service.runtime.Runtime`` protocol.
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
from worker.service.engine import LoadedEngine, load_engine_from_settings
from worker.storage.jobbook import JobBook

if TYPE_CHECKING:
    import torch

    from worker.keys.providers import KeyProvider
    from worker.settings import Settings
    from worker.storage.client import ObjectStore

log = logging.getLogger(__name__)


class Runtime:
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

    def run_engine(self, loaded: LoadedEngine, items: list[tuple[torch.Tensor, bytes]], job_type: str) -> list[Any]:
        """Through this process's micro-batcher (``worker.tasks.batcher``): with the threads pool, several jobs'
        subjects run as one engine call; a lone job or a prefork child runs at once."""
        from worker.tasks import batcher

        return batcher.run_engine(self, loaded, items, job_type)

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    # the prefork parent's metrics thread may hold the lock at the moment of a fork (progress collector)
    global _runtime_lock
    _runtime_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def get_runtime() -> Runtime:
    """This process's runtime (created on first use, once even when task threads race; a forked child gets a
    fresh one)."""
    global _runtime
    rt = _runtime
    if rt is not None and rt.pid == os.getpid():
        return rt
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            from worker.settings import get_settings

            _runtime = Runtime(get_settings())
        return _runtime


def reset_runtime() -> None:
    """Forget the runtime (tests, and a child right after fork)."""
    global _runtime
    _runtime = None
