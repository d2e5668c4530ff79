"""Prometheus metrics of the worker fleet, one registry.

- ``definitions``: every metric, declared once, and the closed label sets;
- ``recording``: task-side helpers (``track_job``, ``stage_timer``, ``images_processed``, ...);
- ``collectors``: queue depth/age from Redis and open-job progress, read at scrape time;
- ``serving``: the registry to serve (merged across processes when multi-process), WSGI app, HTTP server;
- ``celery_hooks``: ``install_celery_hooks``, the lifecycle on Celery's signals;
- ``multiproc``: ``prepare_multiproc_dir``, the explicit set-up a worker's entry point makes first.

Multi-process (Celery prefork): the worker's entry point calls ``prepare_multiproc_dir`` *before*
``prometheus_client`` is imported; ``install_celery_hooks(app, port=...)`` then cleans stale files in the main
process, serves the merged view of every child from the main process, and marks children dead when they exit.
Without a directory (``--pool solo``, one process per GPU, tests) the registry is served directly.

Every public name of those modules is available here (``from worker import metrics``; ``metrics.track_job``).
Importing this package imports nothing else: a submodule is loaded when one of its names is first used, so the
entry point can import ``worker.metrics.multiproc`` before ``prometheus_client``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.metrics.celery_hooks import *  # noqa: F403
    from worker.metrics.collectors import *  # noqa: F403
    from worker.metrics.definitions import *  # noqa: F403
    from worker.metrics.multiproc import *  # noqa: F403
    from worker.metrics.recording import *  # noqa: F403
    from worker.metrics.serving import *  # noqa: F403

# the submodules whose ``__all__`` this package re-exports (multiproc first: it imports no prometheus_client)
SUBMODULES = ("multiproc", "definitions", "recording", "collectors", "serving", "celery_hooks")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    for sub in SUBMODULES:
        module = importlib.import_module(f"{__name__}.{sub}")
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals())
    for sub in SUBMODULES:
        names.update(importlib.import_module(f"{__name__}.{sub}").__all__)
    return sorted(names)
