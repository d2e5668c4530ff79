"""What the service functions need from the process they run in.

``worker.tasks.runtime.Runtime`` (per worker process, rebuilt after fork) implements it; so can a test or a script
with its own settings, store and Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
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
