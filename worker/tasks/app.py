"""The Celery app of the worker fleet: ``celery -A worker.tasks.app worker -Q engine.interactive,engine,engine.bulk``
(an engine worker; ``worker.broker.config.ENGINE_QUEUES``) or ``-Q control``.

At import: settings are validated (clear message on error), the app is configured (JSON only, acks late, reject on
worker lost, prefetch 1, visibility timeout checked against the hard time limit) and the signal handlers are
connected. Nothing heavy happens at import: no torch, no models, no network connection.

Start-up order in a prefork worker:
- ``worker_init`` (main process, before forking): logging + Sentry, fail fast if the model bundle is missing when
  this worker consumes the engine queue, remember which queues it consumes;
- ``worker_process_init`` (each pool child, after fork): fresh per-process runtime; engine workers load the models
  here, once per child (``worker_proc_alive_timeout`` is raised so a slow load is not mistaken for a hung child).
With ``--pool threads`` (the engine worker's pool, for cross-job micro-batching: ``worker.tasks.batcher``) there is
no fork either: the models load in ``worker_init``, and a watchdog enforces the hard time limit, which that pool does
not. With ``--pool solo`` the models load lazily on the first engine task.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

from worker.broker.config import (
    ENGINE_BULK_QUEUE,
    ENGINE_QUEUES,
    TASK_ENROLL,
    TASK_REENROLL_CHUNK,
    TASK_VERIFY,
    ConfigError,
    consumes_engine,
    make_celery,
)
from worker.settings import SettingsError, get_settings

log = logging.getLogger(__name__)

TASK_MODULES = ["worker.tasks.engine_tasks", "worker.tasks.control_tasks"]


def _launched_as_worker() -> bool:
    """``celery ... worker ...`` (the worker command, however started), not ``celery inspect`` or an import."""
    return bool(sys.argv) and "celery" in sys.argv[0] and "worker" in sys.argv[1:]


def _set_metrics_dir(s: Any) -> None:
    """A worker's Prometheus multiprocess directory, whatever started it (local stack, Procfile, compose, k8s, by
    hand): ``worker.metrics.multiproc.prepare_multiproc_dir``, before ``prometheus_client`` is first imported (it
    picks its value class then); pool children inherit it."""
    if not (s.metrics.enabled and _launched_as_worker()):
        return
    from worker.metrics.multiproc import prepare_multiproc_dir

    prepare_multiproc_dir(str(s.metrics.multiproc_dir or "") or None)


try:
    settings = get_settings()
    _set_metrics_dir(settings)
    app = make_celery(settings, include=TASK_MODULES)
except (SettingsError, ConfigError) as _e:
    # a one-screen message instead of a traceback through Celery's loader
    print(f"cancelable worker: {_e}", file=sys.stderr)
    raise SystemExit(2) from None

_consumes: set[str] = set()
# tasks that hand engine work to the batcher (the batcher waits for them while they are in flight)
_ENGINE_SUBMITTERS = frozenset({TASK_ENROLL, TASK_VERIFY, TASK_REENROLL_CHUNK})


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


@signals.task_unknown.connect
def _on_task_unknown(sender: Any = None, message: Any = None, name: Any = None, **kw: Any) -> None:
    """A message for a task name this app does not have (already rejected by Celery): dead letter, and a result for
    its job when the job can be read (``worker.tasks.transport.on_unknown_task``)."""
    from worker.tasks.transport import on_unknown_task

    on_unknown_task(message=message, name=name)


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    from worker import observability
    from worker.service.images import configure_pil

    observability.setup_logging(settings)
    observability.init_sentry(settings)
    configure_pil(settings.worker.max_pixels)
    try:
        queues = set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues)  # type: ignore[union-attr]
    except Exception:  # older/odd consumers: assume everything
        queues = set(ENGINE_QUEUES)
    _consumes.clear()
    _consumes.update(queues)
    _check_key_map(settings)
    if consumes_engine(_consumes):
        from worker.service.engine import check_bundle_present

        check_bundle_present(settings.engine.bundle)  # raises a BundleError with a clear message
    log.info("worker consuming %s", sorted(_consumes))
    if _pool_name(sender) == "threads":
        _start_threads_pool(settings, int(getattr(sender, "concurrency", 1) or 1))


def _check_key_map(s: Any) -> None:
    """KMS provider with ``keys.kms_key_map``: every mapped KMS key exists, is enabled and is an HMAC_256
    ``GENERATE_VERIFY_MAC`` key, or the worker stops here with one line naming the entry (a typo in the map would
    otherwise fail each job of that key with ``unknown_key``)."""
    if s.keys.provider != "kms" or not s.keys.kms_key_map:
        return
    from worker.errors import CancelableError
    from worker.keys.providers import KmsHmacProvider, make_key_provider

    provider = make_key_provider(s)
    assert isinstance(provider, KmsHmacProvider)
    try:
        provider.check_key_map()
    except CancelableError as e:
        print(f"cancelable worker: invalid configuration: CANCELABLE_KEYS__KMS_KEY_MAP: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("KMS key map checked: %d keys", len(s.keys.kms_key_map))


def _pool_name(worker: Any) -> str:
    """``prefork``, ``threads``, ``solo``, ... of the worker being started (the CLI gives a class or an alias)."""
    from celery.concurrency import ALIASES, get_implementation

    try:
        cls = get_implementation(worker.pool_cls)
    except Exception:  # unknown: behave as before
        return "?"
    target = f"{cls.__module__}:{cls.__qualname__}"
    return next((alias for alias, path in ALIASES.items() if path == target), target)


def _start_threads_pool(s: Any, threads: int) -> None:
    """No fork: load the models now (the engine ping reports them loaded), and enforce the hard time limit."""
    from worker.broker.order import gate_background
    from worker.tasks.inflight import INFLIGHT
    from worker.tasks.runtime import engine_batch_started, get_runtime
    from worker.tasks.watchdog import Watchdog

    INFLIGHT.capacity = threads
    Watchdog(float(s.worker.task_time_limit), [INFLIGHT.oldest_start, engine_batch_started]).start()
    # background work never takes the last ``interactive_slots`` task slots: a verify finds one free at once
    most = max(1, threads - int(s.worker.interactive_slots))
    gate_background(lambda: INFLIGHT.background_running() < most)
    if consumes_engine(_consumes):
        try:
            get_runtime().engine()
        except Exception as e:  # tasks report it as bundle_error; the worker stays up
            log.error("model load failed in the engine worker: %s", type(e).__name__)


@signals.task_prerun.connect
def _on_task_prerun(sender: Any = None, **kwargs: Any) -> None:
    from worker.tasks.inflight import INFLIGHT

    name = getattr(sender, "name", None)
    submits = name in _ENGINE_SUBMITTERS
    info = getattr(getattr(sender, "request", None), "delivery_info", None) or {}
    background = (
        name == TASK_REENROLL_CHUNK
        or info.get("routing_key") == ENGINE_BULK_QUEUE
        or bool((kwargs.get("kwargs") or {}).get("parent"))
    )
    INFLIGHT.started(lane=getattr(sender, "job_type", None) if submits else None, background=background)


@signals.task_postrun.connect
def _on_task_postrun(**_: Any) -> None:
    from worker.tasks.inflight import INFLIGHT

    INFLIGHT.finished()


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """In each pool child, after fork: fresh sockets/clients, and the models for engine workers."""
    from worker import observability
    from worker.service.images import configure_pil
    from worker.tasks.runtime import get_runtime, reset_runtime

    reset_runtime()
    observability.init_sentry(settings)
    configure_pil(settings.worker.max_pixels)
    if consumes_engine(_consumes):
        try:
            get_runtime().engine()
        except Exception as e:  # tasks report it as bundle_error; the child stays up
            log.error("model load failed in worker child: %s", type(e).__name__)
