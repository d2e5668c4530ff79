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
from dataclasses import dataclass
from typing import Any

from worker.tasks.batcher import Coming


@dataclass
class _Task:
    start: float
    lane: str | None  # the job type it will still submit engine work for (None: none, or already submitted)
    background: bool
    waiting_since: float | None = None  # waiting for the engine thread since (None: not waiting)
    waited: float = 0.0  # seconds spent waiting for the engine thread so far


class InFlight:
    """Tasks running in this process (keyed by thread): which of them will still submit engine work, to which lane
    (and whether it is interactive), and how long the longest has run outside its waits for the engine thread (for
    the watchdog). Fed by Celery's ``task_prerun`` / ``task_postrun`` signals and by ``WorkerRuntime.engine_call``
    (a task stops preparing when it submits, and waits until its results come back)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._tasks: dict[int, _Task] = {}  # by thread
        self._listeners: list[Callable[[], None]] = []
        self.capacity = 1  # task slots of this process (the threads pool's concurrency; 1: prefork child, solo)

    def started(self, lane: str | None, background: bool = False) -> None:
        """The task on this thread started; ``lane``: the job type it will submit engine work for (None: none);
        ``background``: that work yields to interactive work."""
        with self._lock:
            self._tasks[threading.get_ident()] = _Task(self._clock(), lane, background)
        self._notify()

    def submitting(self) -> None:
        """The task on this thread hands its engine work over now: it is no longer preparing any, and waits."""
        with self._lock:
            task = self._tasks.get(threading.get_ident())
            if task is not None:
                task.lane, task.waiting_since = None, self._clock()

    def resumed(self) -> None:
        """The task on this thread has its engine results (or error) back and runs on."""
        with self._lock:
            task = self._tasks.get(threading.get_ident())
            if task is not None and task.waiting_since is not None:
                task.waited += self._clock() - task.waiting_since
                task.waiting_since = None

    def finished(self) -> None:
        with self._lock:
            self._tasks.pop(threading.get_ident(), None)
        self._notify()

    def preparing(self) -> dict[str, int]:
        """Lane -> tasks that will still submit to it."""
        out: dict[str, int] = {}
        with self._lock:
            for t in self._tasks.values():
                if t.lane is not None:
                    out[t.lane] = out.get(t.lane, 0) + 1
        return out

    def background_running(self) -> int:
        """Tasks of background work (bulk enrolment children, re-enrolment chunks) running in this process."""
        with self._lock:
            return sum(1 for t in self._tasks.values() if t.background)

    def preparing_interactive(self) -> int:
        """Tasks that will still submit interactive engine work (an enrol or a verify being downloaded, aligned)."""
        with self._lock:
            return sum(1 for t in self._tasks.values() if t.lane is not None and not t.background)

    def free_slots(self) -> int:
        with self._lock:
            return max(0, self.capacity - len(self._tasks))

    def oldest_start(self) -> float | None:
        """The watchdog's clock: the earliest start of a task not waiting for the engine thread, moved on by the time
        it has waited (queued behind other batches is not stuck; an engine batch has its own clock)."""
        with self._lock:
            return min((t.start + t.waited for t in self._tasks.values() if t.waiting_since is None), default=None)

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
    return Coming(INFLIGHT.preparing(), queued, INFLIGHT.preparing_interactive())
