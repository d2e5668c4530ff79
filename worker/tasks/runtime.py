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
    from worker.keys.providers import KeyProvider
    from worker.settings import Settings
    from worker.storage.client import ObjectStore

log = logging.getLogger(__name__)


class Runtime:
    """Lazily created per-process resources."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._redis: Any = None
        self._store: ObjectStore | None = None
        self._keys: KeyProvider | None = None
        self._engine: LoadedEngine | None = None

    @property
    def redis(self) -> Any:
        """The Redis client of the job book (and of the bulk task's queue-depth check)."""
        if self._redis is None:
            self._redis = connect_redis(self.settings)
        return self._redis

    @property
    def book(self) -> JobBook:
        return JobBook(self.redis)

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = connect_store(self.settings)
        return self._store

    @property
    def keys(self) -> KeyProvider:
        if self._keys is None:
            from worker.keys.providers import make_key_provider

            self._keys = make_key_provider(self.settings, self.store)
        return self._keys

    def engine(self) -> LoadedEngine:
        with self._lock:
            if self._engine is None:
                self._engine = load_engine_from_settings(self.settings, self.store)
            return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's runtime (created on first use; a forked child gets a fresh one)."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        from worker.settings import get_settings

        _runtime = Runtime(get_settings())
    return _runtime


def reset_runtime() -> None:
    """Forget the runtime (tests, and a child right after fork)."""
    global _runtime
    _runtime = None
