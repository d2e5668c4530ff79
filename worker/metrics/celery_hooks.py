"""The metrics lifecycle on Celery's signals (``install_celery_hooks``): stale-file clean-up and the server in the
worker's main process, dead-process marking in pool children, ``sent_at`` stamping on published messages."""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import multiprocess

from worker.metrics.collectors import ProgressSource, stamp_sent_at
from worker.metrics.serving import cleanup_multiproc_dir, multiproc_dir, start_metrics_server

log = logging.getLogger(__name__)

__all__ = ["install_celery_hooks"]

_server: list[Any] = []


def install_celery_hooks(
    app: Any = None,
    *,
    port: int | None,
    addr: str = "0.0.0.0",
    redis_url: str | None = None,
    progress_source: ProgressSource | None = None,
) -> None:
    """Connect the metrics lifecycle to Celery's signals. Call once where the Celery app is built.

    - ``worker_init`` (main process, before the pool forks): delete stale multiprocess files, start the server
      on ``port`` (``None``: serve nothing, e.g. producers). ``redis_url`` adds queue depth/age; pass it on the
      control worker only (fleet-wide values; dashboards take ``max``), likewise ``progress_source``.
    - ``worker_process_shutdown`` (each pool child on exit): ``multiprocess.mark_process_dead(pid)``.
    - ``worker_shutdown`` (main): stop the server.
    - ``before_task_publish``: stamp ``sent_at`` on messages this process publishes (fan-out chunks).
    """
    from celery import signals

    def _on_worker_init(**_: Any) -> None:
        removed = cleanup_multiproc_dir()
        if removed:
            log.info("removed %d stale metric files", removed)
        if port is None:
            return
        client = None
        if redis_url:
            import redis

            client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        _server.append(start_metrics_server(port, addr=addr, redis_client=client, progress_source=progress_source))

    def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
        path = multiproc_dir()
        if path:
            multiprocess.mark_process_dead(pid or os.getpid(), path)

    def _on_worker_shutdown(**_: Any) -> None:
        while _server:
            server, _thread = _server.pop()
            server.shutdown()
            server.server_close()

    signals.worker_init.connect(_on_worker_init, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.before_task_publish.connect(stamp_sent_at, weak=False)
