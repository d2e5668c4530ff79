"""Sentry and logging for the worker, both behind one scrubber that keeps secrets out of every event and log line.

- ``redaction``: the ``Scrubber`` (``SCRUBBER``, secrets from settings) and ``RedactionFilter``, the logging filter
  that applies it (``worker.keys`` imports this module only, for botocore's loggers);
- ``context``: ``job_scope`` / ``current_job``, the job whose ID, type and tenant go on log lines and Sentry tags;
- ``sentry``: ``init_sentry(settings)``, called by the worker at start (never at import);
- ``logs``: ``setup_logging(settings)``, one redacting root handler, text or JSON lines.
"""

from worker.observability.context import current_job, job_scope
from worker.observability.logs import (
    CELERY_TASK_LOGGERS,
    LOG_FORMAT,
    JsonFormatter,
    install_redaction,
    quiet_celery_task_lines,
    setup_logging,
)
from worker.observability.redaction import (
    FILTERED,
    SCRUBBER,
    RedactionFilter,
    Scrubber,
    sensitive_name,
    settings_secrets,
)
from worker.observability.sentry import init_sentry

__all__ = [
    "CELERY_TASK_LOGGERS",
    "FILTERED",
    "LOG_FORMAT",
    "SCRUBBER",
    "JsonFormatter",
    "RedactionFilter",
    "Scrubber",
    "current_job",
    "init_sentry",
    "install_redaction",
    "job_scope",
    "quiet_celery_task_lines",
    "sensitive_name",
    "settings_secrets",
    "setup_logging",
]
