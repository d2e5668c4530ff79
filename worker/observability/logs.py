"""Logging for the worker: ``setup_logging(settings)`` installs one root stream handler carrying the redaction filter
(text lines, or JSON with ``CANCELABLE_LOG_FORMAT=json``), quiets Celery's per-task lines and puts the filter on the
handlers Celery installs later."""

from __future__ import annotations

import logging
import sys
from typing import Any

from worker.observability.redaction import SCRUBBER, RedactionFilter, settings_secrets

LOG_FORMAT = (
    "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s [job %(job_id)s %(job_type)s tenant %(tenant)s]: "
    "%(message)s"
)


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={...}`` fields of a record (scrubbed like the message)."""
    return {
        k: SCRUBBER.scrub(v, k)
        for k, v in vars(record).items()
        if k not in _RECORD_FIELDS and k not in ("job_id", "job_type", "tenant") and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``CANCELABLE_LOG_FORMAT=json``): time, level, logger, process, job ID, job type,
    tenant, message and, for errors, the (scrubbed) traceback."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "process": f"{record.processName}[{record.process}]",
            "job_id": getattr(record, "job_id", "-"),
            "job_type": getattr(record, "job_type", "-"),
            "tenant": getattr(record, "tenant", "-"),
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in _extras(record).items() if k not in out})
        if record.exc_text:
            out["traceback"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def _formatter() -> logging.Formatter:
    import os

    return JsonFormatter() if os.environ.get("CANCELABLE_LOG_FORMAT", "text") == "json" else _TextFormatter(LOG_FORMAT)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        for name in ("job_id", "job_type", "tenant"):  # records that did not pass the filter (another handler's)
            if not hasattr(record, name):
                setattr(record, name, "-")
        text = super().format(record)
        extras = _extras(record)
        if extras:  # extra={...} fields would otherwise be lost in plain text
            head, nl, rest = text.partition("\n")
            text = head + " (" + ", ".join(f"{k}={v}" for k, v in sorted(extras.items())) + ")" + nl + rest
        return text


def setup_logging(settings: Any = None, level: str | int = "INFO", stream: Any = None) -> logging.Handler:
    """Replace the root handlers with one stream handler carrying the ``RedactionFilter``; returns the handler.

    Secrets from ``settings`` are registered with the scrubber first.
    """
    if settings is not None:
        SCRUBBER.add_secrets(settings_secrets(settings))
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_formatter())
    handler.addFilter(RedactionFilter(SCRUBBER))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_cancelable", False):
            root.removeHandler(h)
    handler._cancelable = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    quiet_celery_task_lines()
    _connect_celery_logging()
    return handler


# Celery's own per-task INFO lines carry no job scope (they are written outside the task) and repeat what the job's
# own lines say: "Task ... received" (the job logs "started"), "Task ... succeeded in ...: <return value>" (the job
# logs its outcome, a failed job at WARNING: Celery would call that task "succeeded") and "Task ... retry" (the job
# logs "transient ...: retrying"). Celery's WARNING and ERROR lines (a task that raised, a lost worker) stay.
CELERY_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def quiet_celery_task_lines() -> None:
    """Raise Celery's per-task loggers to WARNING (before the worker builds its tracers, which read the level once)."""
    for name in CELERY_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


_celery_logging_connected: list[bool] = []


def _connect_celery_logging() -> None:
    """Celery's worker replaces the root handlers AFTER ``worker_init`` (``worker_hijack_root_logger``): put the
    redaction filter on the handlers it installs, for the root and the task loggers."""
    if _celery_logging_connected:
        return
    try:
        from celery import signals
    except ImportError:  # pragma: no cover - producers without celery
        return

    def _on_logger(logger: logging.Logger | None = None, **_: Any) -> None:
        install_redaction(logger)
        install_redaction(logging.getLogger())

    signals.after_setup_logger.connect(_on_logger, weak=False)
    signals.after_setup_task_logger.connect(_on_logger, weak=False)
    _celery_logging_connected.append(True)


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Add the redaction filter to every handler of ``logger`` (default root), e.g. after Celery set up its own."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactionFilter) for f in h.filters):
            h.addFilter(RedactionFilter(SCRUBBER))
            h.setFormatter(_formatter())  # Celery's own handlers: the same line format, job ID included
