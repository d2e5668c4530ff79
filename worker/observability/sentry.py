"""Sentry for the worker: ``init_sentry(settings)`` is called by the worker at start (never at import); every event
and breadcrumb goes through the redaction scrubber (``worker.observability.redaction``) first."""

from __future__ import annotations

import logging
from typing import Any

from worker.observability.redaction import SCRUBBER, settings_secrets


def init_sentry(settings: Any, transport: Any = None, **options: Any) -> bool:
    """Initialise Sentry from ``settings.sentry`` (dsn, environment, release, traces_sample_rate).

    Returns False (and does nothing) without a DSN. ``transport`` replaces the HTTP transport (tests). Call it from
    the worker's start hook (``worker_init`` / ``worker_process_init``), never at import.
    """
    conf = getattr(settings, "sentry", None)
    secret = getattr(conf, "dsn", None)
    dsn = secret.get_secret_value() if secret is not None and hasattr(secret, "get_secret_value") else secret
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    SCRUBBER.add_secrets(settings_secrets(settings))
    release = getattr(conf, "release", None) or _package_version()
    kwargs: dict[str, Any] = {
        "dsn": dsn,
        "environment": getattr(conf, "environment", None) or "development",
        "release": release,
        "traces_sample_rate": float(getattr(conf, "traces_sample_rate", 0.0) or 0.0),
        "include_local_variables": True,
        "max_request_body_size": "never",
        "before_send": SCRUBBER.scrub_event,
        "before_breadcrumb": SCRUBBER.scrub_breadcrumb,
        "integrations": [
            CeleryIntegration(monitor_beat_tasks=False, propagate_traces=False),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        "default_integrations": True,
    }
    if transport is not None:
        kwargs["transport"] = transport
    kwargs.update(options)
    sentry_sdk.init(**kwargs)
    sentry_sdk.set_tag("service", "cancelable-worker")
    return True


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return f"cancelable-faces@{version('cancelable-faces')}"
    except Exception:
        return None
