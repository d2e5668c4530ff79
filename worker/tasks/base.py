"""The Celery ``Task`` class of this app.

- every task is accepted through ``transport.guarded_strategy`` (a malformed message never stops the consumer);
- ``max_retries = None``: how long a transient fault is retried is decided by the job envelope
  (``worker.tasks.envelope.JobTask.run_job``: a time window), never by Celery's default of 3 retries, which would
  fail the task without storing a result.
"""

from __future__ import annotations

from celery import Task


class GuardedTask(Task):  # type: ignore[misc]
    Strategy = "worker.tasks.transport:guarded_strategy"
    max_retries = None
