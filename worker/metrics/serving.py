"""Serving ``/metrics``: the registry to expose (this process's, or the merged view of every process writing to the
multiprocess directory, plus the fleet collectors), a WSGI app, an HTTP server thread, and the clean-up of stale
multiprocess files.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess

from worker.metrics.collectors import ProgressCollector, ProgressSource, QueueCollector
from worker.metrics.definitions import MULTIPROCESS, REGISTRY

log = logging.getLogger(__name__)

__all__ = ["build_registry", "cleanup_multiproc_dir", "make_wsgi_app", "multiproc_dir", "start_metrics_server"]

_DB_PID = re.compile(r"_(\d+)\.db$")


def multiproc_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") if MULTIPROCESS else None


def cleanup_multiproc_dir(keep_pid: int | None = None) -> int:
    """Delete metric files of other processes (stale runs). Call once in the main process before forking.

    Files of ``keep_pid`` (default: this process) stay, because this process has them open.
    """
    path = multiproc_dir()
    if not path:
        return 0
    keep = os.getpid() if keep_pid is None else keep_pid
    removed = 0
    for f in glob.glob(os.path.join(path, "*.db")):
        m = _DB_PID.search(f)
        if m and int(m.group(1)) != keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LiveMultiProcessCollector(multiprocess.MultiProcessCollector):
    """MultiProcessCollector that first drops live-gauge files of processes that died without a shutdown signal
    (SIGKILL, OOM), so a killed child's in-flight jobs and GPU memory do not linger."""

    def collect(self):  # type: ignore[override]
        for f in glob.glob(os.path.join(self._path, "gauge_live*.db")):
            m = _DB_PID.search(f)
            if m and not _pid_alive(int(m.group(1))):
                multiprocess.mark_process_dead(int(m.group(1)), self._path)
        return super().collect()


def build_registry(redis_client: Any = None, progress_source: ProgressSource | None = None) -> CollectorRegistry:
    """The registry to serve: all worker metrics (merged across processes when multi-process) plus, when given,
    the queue collector on ``redis_client`` and the progress collector on ``progress_source``."""
    path = multiproc_dir()
    if path:
        registry = CollectorRegistry()
        _LiveMultiProcessCollector(registry, path=path)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    if redis_client is not None:
        registry.register(QueueCollector(redis_client))
    if progress_source is not None:
        registry.register(ProgressCollector(progress_source))
    return registry


class _Forward:
    """Serves the module registry inside another registry without re-registering its metrics."""

    def __init__(self, inner: CollectorRegistry):
        self._inner = inner

    def collect(self):
        return self._inner.collect()


def make_wsgi_app(redis_client: Any = None, progress_source: ProgressSource | None = None) -> Callable:
    """WSGI app serving ``/metrics`` (and any path) for embedding in another server."""
    return prometheus_client.make_wsgi_app(build_registry(redis_client, progress_source))


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", redis_client: Any = None, progress_source: ProgressSource | None = None
) -> tuple[Any, threading.Thread]:
    """Serve metrics on ``addr:port`` from a daemon thread; returns ``(server, thread)``; ``server.shutdown()``
    stops it. ``port=0`` picks a free port (``server.server_port``)."""
    server, thread = prometheus_client.start_http_server(
        port, addr=addr, registry=build_registry(redis_client, progress_source)
    )
    log.info("metrics served on %s:%d (multiprocess=%s)", addr, server.server_port, bool(multiproc_dir()))
    return server, thread
