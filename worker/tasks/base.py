"""The Celery ``Task`` class of this app: every task is accepted through ``transport.guarded_strategy``."""

from __future__ import annotations

from celery import Task


class GuardedTask(Task):  # type: ignore[misc]
    Strategy = "worker.tasks.transport:guarded_strategy"
