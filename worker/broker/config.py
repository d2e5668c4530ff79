"""Celery configuration shared by workers and producers (imports neither torch nor boto3, nor any task module).

Task names are the wire API: producers ``send_task`` by name and never import the task code. Routing is by name,
so a producer that forgets ``queue=`` still lands on the right queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.settings import Settings
    from worker.storage.client import ObjectStore

# GPU work is split by who waits for it. An engine worker consumes ENGINE_QUEUES in this order and always takes from
# the first non-empty one (``worker.broker.order.QueueOrder``), so a user's enrol or verify never waits behind work
# that a bulk job or a revocation queued before it.
ENGINE_INTERACTIVE_QUEUE = "engine.interactive"  # enrol, verify: a person or a producer waits for the answer
ENGINE_BULK_QUEUE = "engine.bulk"  # bulk enrolment children, re-enrolment chunks of a revocation
LEGACY_ENGINE_QUEUE = "engine"  # the single engine queue of earlier releases: drained during an upgrade
ENGINE_QUEUES: tuple[str, ...] = (ENGINE_INTERACTIVE_QUEUE, LEGACY_ENGINE_QUEUE, ENGINE_BULK_QUEUE)
ENGINE_QUEUE = ENGINE_INTERACTIVE_QUEUE  # where enrol and verify are routed by name
CONTROL_QUEUE = "control"  # fan-out, bulk streaming, bookkeeping
WORKER_QUEUE_ORDER: tuple[str, ...] = (ENGINE_INTERACTIVE_QUEUE, LEGACY_ENGINE_QUEUE, CONTROL_QUEUE, ENGINE_BULK_QUEUE)

TASK_ENROLL = "cancelable.enroll"
TASK_VERIFY = "cancelable.verify"
TASK_REENROLL_CHUNK = "cancelable.reenroll_chunk"
TASK_REVOKE = "cancelable.revoke"
TASK_BULK = "cancelable.bulk"
TASK_PING = "cancelable.ping"  # control queue liveness
TASK_SWEEP_STAGING = "cancelable.sweep_staging"  # periodic (Celery beat): orphaned staging objects
TASK_SWEEP_UPLOADS = "cancelable.sweep_uploads"  # periodic (Celery beat): uploaded photos past their retention
TASK_ERASE = "cancelable.erase"
TASK_SWEEP_RETENTION = "cancelable.sweep_retention"  # periodic (Celery beat, daily): subjects past their retention
RETENTION_SWEEP_INTERVAL_S = 86400.0
TASK_RECONCILE = "cancelable.reconcile"  # periodic (Celery beat): dead letters that missed S3 during an outage
RECONCILE_INTERVAL_S = 60.0
TASK_ENGINE_PING = "cancelable.engine_ping"  # engine queue liveness (reports whether the models are loaded)

TASK_ROUTES: dict[str, dict[str, str]] = {
    TASK_ENROLL: {"queue": ENGINE_QUEUE},
    TASK_VERIFY: {"queue": ENGINE_QUEUE},
    TASK_REENROLL_CHUNK: {"queue": ENGINE_BULK_QUEUE},
    TASK_REVOKE: {"queue": CONTROL_QUEUE},
    TASK_BULK: {"queue": CONTROL_QUEUE},
    TASK_ERASE: {"queue": CONTROL_QUEUE},
    TASK_SWEEP_RETENTION: {"queue": CONTROL_QUEUE},
    TASK_PING: {"queue": CONTROL_QUEUE},
    TASK_SWEEP_STAGING: {"queue": CONTROL_QUEUE},
    TASK_SWEEP_UPLOADS: {"queue": CONTROL_QUEUE},
    TASK_RECONCILE: {"queue": CONTROL_QUEUE},
    TASK_ENGINE_PING: {"queue": ENGINE_QUEUE},
}


class ConfigError(ValueError):
    """A Celery setting that would make the worker unsafe (e.g. tasks delivered twice)."""


@dataclass(frozen=True)
class QueueSettings:
    """The knobs this module needs; filled from ``worker.settings`` by ``queue_settings``."""

    broker_url: str
    result_backend: str
    visibility_timeout_s: int
    task_time_limit_s: int
    task_soft_time_limit_s: int
    result_expires_s: int = 7 * 24 * 3600
    unacked_restore_interval_s: float = 10.0
    sweep_staging_interval_s: int = 3600
    sweep_uploads: bool = True
    sweep_retention: bool = False


def check_queue_settings(q: QueueSettings) -> None:
    """Refuse settings under which Redis would hand a still-running task to a second worker."""
    if q.task_soft_time_limit_s >= q.task_time_limit_s:
        raise ConfigError(
            f"task soft time limit ({q.task_soft_time_limit_s} s) must be below the hard limit "
            f"({q.task_time_limit_s} s)"
        )
    if q.visibility_timeout_s <= q.task_time_limit_s:
        raise ConfigError(
            f"broker visibility_timeout ({q.visibility_timeout_s} s) must exceed the task hard time limit "
            f"({q.task_time_limit_s} s), otherwise Redis re-delivers tasks that are still running"
        )


def celery_config(q: QueueSettings) -> dict[str, Any]:
    """The Celery settings dict (lower-case names) for workers and producers alike."""
    check_queue_settings(q)
    return {
        "broker_url": q.broker_url,
        # kombu's Redis transport, refusing poison messages instead of dying on them (worker/tasks/transport.py)
        "broker_transport": "worker.tasks.transport:Transport",
        "result_backend": q.result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": q.task_time_limit_s,
        "task_soft_time_limit": q.task_soft_time_limit_s,
        "broker_transport_options": {
            "visibility_timeout": q.visibility_timeout_s,
            "unacked_restore_interval": q.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
            # poll the consumed queues in a fixed order (interactive first), not round robin
            "queue_order_strategy": "worker.broker.order:QueueOrder",
        },
        "result_backend_transport_options": {"visibility_timeout": q.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "result_expires": q.result_expires_s,
        "result_extended": True,
        "task_routes": TASK_ROUTES,
        "task_default_queue": CONTROL_QUEUE,
        "task_create_missing_queues": True,
        "task_track_started": True,
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
        # loading a model bundle in a fresh child can take longer than Celery's default 4 s liveness wait
        "worker_proc_alive_timeout": 300,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
        "timezone": "UTC",
        "beat_schedule": {
            "reconcile": {
                "task": TASK_RECONCILE,
                "schedule": RECONCILE_INTERVAL_S,
                "options": {"expires": RECONCILE_INTERVAL_S},
            },
            **(
                {
                    "sweep-staging": {
                        "task": TASK_SWEEP_STAGING,
                        "schedule": float(q.sweep_staging_interval_s),
                        # a sweep that waited longer than one interval is superseded by the next one
                        "options": {"expires": float(q.sweep_staging_interval_s)},
                    }
                }
                if q.sweep_staging_interval_s > 0
                else {}
            ),
            **(
                {
                    "sweep-uploads": {
                        "task": TASK_SWEEP_UPLOADS,
                        "schedule": float(q.sweep_staging_interval_s),
                        "options": {"expires": float(q.sweep_staging_interval_s)},
                    }
                }
                if q.sweep_staging_interval_s > 0 and q.sweep_uploads
                else {}
            ),
            **(
                {
                    "sweep-retention": {
                        "task": TASK_SWEEP_RETENTION,
                        "schedule": RETENTION_SWEEP_INTERVAL_S,
                        "options": {"expires": RETENTION_SWEEP_INTERVAL_S},
                    }
                }
                if q.sweep_retention
                else {}
            ),
        },
    }


def queue_settings(settings: Settings) -> QueueSettings:
    """``worker.settings.Settings`` -> the queue knobs (one Redis URL serves as broker and result backend)."""
    url = settings.redis.require_url()  # SettingsError when not configured: never a guessed default
    w = settings.worker
    return QueueSettings(
        broker_url=url,
        result_backend=url,
        visibility_timeout_s=int(w.visibility_timeout),
        task_time_limit_s=int(w.task_time_limit),
        task_soft_time_limit_s=int(w.soft_time_limit),
        unacked_restore_interval_s=float(min(10.0, max(1.0, w.visibility_timeout / 10))),
        sweep_staging_interval_s=int(w.sweep_staging_interval),
        sweep_uploads=int(w.upload_retention) > 0,
        sweep_retention=int(getattr(w, "template_retention_days", 0)) > 0,
    )


def make_celery(settings: Settings, *, name: str = "cancelable", include: list[str] | None = None) -> Any:
    """A configured Celery app. Workers pass ``include`` (their task modules); producers pass nothing and send
    tasks by name only."""
    from celery import Celery

    app = Celery(name, include=include or [], task_cls="worker.tasks.base:GuardedTask")
    app.conf.update(celery_config(queue_settings(settings)))
    return app


def consumes_engine(queues: set[str] | frozenset[str]) -> bool:
    """Whether a worker consuming ``queues`` runs engine work (loads the models)."""
    return any(q in queues for q in ENGINE_QUEUES)


def connect_redis(settings: Settings) -> Any:
    """A Redis client for the job bookkeeping (``settings.redis.url``), with bounded socket timeouts."""
    import redis

    return redis.Redis.from_url(settings.redis.require_url(), socket_timeout=10.0, socket_connect_timeout=5.0)


def connect_store(settings: Settings) -> ObjectStore:
    """The S3 ``ObjectStore`` from ``settings.s3`` (imports boto3 only when called)."""
    from worker.storage.client import ObjectStore

    return ObjectStore.from_settings(settings.s3)
