"""The job a thread is working on (``job_scope``): its ID, type and tenant go on every log line and tag every Sentry
event raised inside it."""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

_JOB: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar("cancelable_job", default=None)


@contextlib.contextmanager
def job_scope(job_id: str, job_type: str, tenant: str | None = None) -> Iterator[None]:
    """Inside: every log line carries the job ID, job type and tenant, and every Sentry event is tagged with them.
    (A tenant ID names a customer, not a person; subjects, keys and seeds are never put here.)"""
    token = _JOB.set((str(job_id), str(job_type), str(tenant) if tenant else "-"))
    try:
        sentry_sdk = sys.modules.get("sentry_sdk")
        if sentry_sdk is None:
            yield
            return
        with sentry_sdk.isolation_scope() as scope:
            scope.set_tag("job_id", str(job_id))
            scope.set_tag("job_type", str(job_type))
            if tenant:
                scope.set_tag("tenant", str(tenant))
            yield
    finally:
        _JOB.reset(token)


def current_job() -> tuple[str, str, str] | None:
    """(job ID, job type, tenant) of the ``job_scope`` this thread is in, or None (e.g. for a worker thread that
    runs work on a job's behalf: it re-enters the scope with ``job_scope(*current_job())``)."""
    return _JOB.get()
