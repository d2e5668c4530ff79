"""The Prometheus multiprocess directory of a worker, set up explicitly by its entry point (``worker/tasks/app.py``).

``prometheus_client`` picks its value class (in-memory, or mmap files in ``PROMETHEUS_MULTIPROC_DIR``) when it is
first imported, so ``prepare_multiproc_dir`` has to run before anything imports it (``worker.metrics.definitions``
and the modules that use it). This module imports nothing of prometheus_client; importing ``worker.metrics`` (the
package) does not either until a metric is used.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"

__all__ = ["prepare_multiproc_dir"]


def prepare_multiproc_dir(configured: str | None = None) -> str:
    """Give this process, and the pool children it forks, a multiprocess directory; returns its path.

    ``PROMETHEUS_MULTIPROC_DIR`` when the launcher set it, else ``configured`` (``metrics.multiproc_dir`` of the
    settings), else a private temporary directory that this process removes when it exits. The directory is created
    and ``PROMETHEUS_MULTIPROC_DIR`` set. Without it a prefork pool's children count into files nobody serves and
    every counter on ``/metrics`` stays 0.
    """
    path = os.environ.get(ENV) or configured or None
    if path is None:
        path = tempfile.mkdtemp(prefix="cancelable-metrics-")
        owner, made = os.getpid(), path

        def _remove() -> None:  # forked pool children inherit atexit handlers: only the maker removes it
            if os.getpid() == owner:
                shutil.rmtree(made, ignore_errors=True)

        atexit.register(_remove)
    os.makedirs(path, exist_ok=True)
    if "prometheus_client" in sys.modules and os.environ.get(ENV) != path:
        print(
            "cancelable worker: prometheus_client was imported before the metrics directory was set; "
            "metrics stay per-process",
            file=sys.stderr,
        )
    os.environ[ENV] = path
    return path
