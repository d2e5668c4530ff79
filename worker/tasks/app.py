"""The Celery app of the worker fleet: ``celery -A worker.tasks.app worker -Q engine`` (or ``-Q control``).

At import: settings are validated (clear message on error), the app is configured (JSON only, acks late, reject on
worker lost, prefetch 1, visibility timeout checked against the hard time limit) and the signal handlers are
connected. Nothing heavy happens at import: no torch, no models, no network connection.

Start-up order in a prefork worker:
- ``worker_init`` (main process, before forking): logging + Sentry, fail fast if the model bundle is missing when
  this worker consumes the engine queue, remember which queues it consumes;
- ``worker_process_init`` (each pool child, after fork): fresh per-process runtime; engine workers load the models
  here, once per child (``worker_proc_alive_timeout`` is raised so a slow load is not mistaken for a hung child).
With ``--pool solo`` there is no fork and the models load lazily on the first engine task.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from worker.broker.config import ENGINE_QUEUE, ConfigError, make_celery
from worker.settings import SettingsError, get_settings

log = logging.getLogger(__name__)

TASK_MODULES = ["worker.tasks.engine_tasks", "worker.tasks.control_tasks"]

try:
    settings = get_settings()
    app = make_celery(settings, include=TASK_MODULES)
except (SettingsError, ConfigError) as _e:
    # a one-screen message instead of a traceback through Celery's loader
    print(f"cancelable worker: {_e}", file=sys.stderr)
    raise SystemExit(2) from None

_consumes: set[str] = set()


def _progress_source() -> Any:
    from worker.metrics import open_job_snapshots
    from worker.tasks.runtime import get_runtime

    return open_job_snapshots(get_runtime().book)


if settings.metrics.enabled:
    from worker import metrics

    metrics.install_celery_hooks(
        app,
        port=settings.metrics.port,
        addr=settings.metrics.host,
        redis_url=settings.redis.require_url(),
        progress_source=_progress_source,
    )


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    from worker import observability
    from worker.service.images import configure_pil

    observability.setup_logging(settings)
    observability.init_sentry(settings)
    configure_pil(settings.worker.max_pixels)
    try:
        queues = set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - older/odd consumers: assume everything
        queues = {ENGINE_QUEUE}
    _consumes.clear()
    _consumes.update(queues)
    if ENGINE_QUEUE in _consumes:
        from worker.service.engine import check_bundle_present

        check_bundle_present(settings.engine.bundle)  # raises a BundleError with a clear message
    log.info("worker consuming %s", sorted(_consumes))


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """In each pool child, after fork: fresh sockets/clients, and the models for engine workers."""
    from worker import observability
    from worker.service.images import configure_pil
    from worker.tasks.runtime import get_runtime, reset_runtime

    reset_runtime()
    observability.init_sentry(settings)
    configure_pil(settings.worker.max_pixels)
    if ENGINE_QUEUE in _consumes:
        try:
            get_runtime().engine()
        except Exception as e:  # noqa: BLE001 - tasks report it as bundle_error; the child stays up
            log.error("model load failed in worker child: %s", type(e).__name__)
