"""What the tasks of this engine worker process are doing, for the micro-batcher (``worker.tasks.batcher``) and the
watchdog (``worker.tasks.watchdog``): which tasks run (``INFLIGHT``, fed by Celery's ``task_prerun`` /
``task_postrun`` signals), which of them will still submit engine work, and the delivery a task thread runs
(attempt number, background or interactive: ``delivery_attempt``)."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from worker.tasks.batcher import Coming


class InFlight:
    """Tasks running in this process (keyed by thread): which of them will still submit engine work, to which lane,
    and when the oldest started (for the watchdog). Fed by Celery's ``task_prerun`` / ``task_postrun`` signals and
    by ``WorkerRuntime.engine_call`` (a task stops preparing when it submits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[int, tuple[float, str | None]] = {}  # thread -> (start, lane it will submit to, or None)
        self._listeners: list[Callable[[], None]] = []
        self.capacity = 1  # task slots of this process (the threads pool's concurrency; 1: prefork child, solo)

    def started(self, lane: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        """The task on this thread started; ``lane``: the job type it will submit engine work for (None: none)."""
        with self._lock:
            self._tasks[threading.get_ident()] = (clock(), lane)
        self._notify()

    def submitting(self) -> None:
        """The task on this thread hands its engine work over now (it is no longer preparing any)."""
        with self._lock:
            start = self._tasks.get(threading.get_ident())
            if start is not None:
                self._tasks[threading.get_ident()] = (start[0], None)

    def finished(self) -> None:
        with self._lock:
            self._tasks.pop(threading.get_ident(), None)
        self._notify()

    def preparing(self) -> dict[str, int]:
        """Lane -> tasks that will still submit to it."""
        out: dict[str, int] = {}
        with self._lock:
            for _, lane in self._tasks.values():
                if lane is not None:
                    out[lane] = out.get(lane, 0) + 1
        return out

    def free_slots(self) -> int:
        with self._lock:
            return max(0, self.capacity - len(self._tasks))

    def oldest_start(self) -> float | None:
        with self._lock:
            return min((t for t, _ in self._tasks.values()), default=None)

    def listen(self, fn: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def unlisten(self, fn: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn()


INFLIGHT = InFlight()

# the attempt number of the delivery running on this thread (``worker.tasks.envelope.JobTask.run_job`` sets it)
_ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("cancelable_attempt", default=1)
# whether that delivery is background work (bulk, re-enrolment), which yields to interactive work in the batcher
_BACKGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("cancelable_background", default=False)


@contextlib.contextmanager
def delivery_attempt(attempt: int, background: bool = False) -> Iterator[None]:
    """Mark the code inside as running delivery number ``attempt`` of its job (> 1: its engine work runs alone);
    ``background``: its engine work yields to interactive work."""
    token = _ATTEMPT.set(attempt)
    token_bg = _BACKGROUND.set(background)
    try:
        yield
    finally:
        _BACKGROUND.reset(token_bg)
        _ATTEMPT.reset(token)


def current_delivery() -> tuple[int, bool]:
    """(attempt number, background) of the delivery running in this context: (1, False) outside ``delivery_attempt``."""
    return _ATTEMPT.get(), _BACKGROUND.get()


def expected_submitters(redis: Any) -> Coming:
    """Engine work that will reach the batcher soon: the tasks of this process still preparing theirs (per lane),
    and as many messages waiting on the engine queues (``redis``: the broker's client) as this process has free
    task slots (a burst's first messages start before the consumer has fetched the rest)."""
    from worker.broker.config import ENGINE_QUEUES

    queued = 0
    free = INFLIGHT.free_slots()
    if free > 0 and INFLIGHT.capacity > 1:
        try:
            queued = min(free, sum(int(redis.llen(q)) for q in ENGINE_QUEUES))
        except Exception:  # broker unreachable: the fill timeout still bounds the wait
            pass
    return Coming(INFLIGHT.preparing(), queued)
