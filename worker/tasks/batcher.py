"""Cross-job micro-batching of engine calls inside one engine worker process.

With the Celery ``threads`` pool every engine message still runs as its own task on its own thread (its own attempt
count, retries, dead letter, stored result and late ack, exactly as with the prefork pool). Each task thread does its
per-job work (key checks, download, decode, align, seed), then hands its subjects to ``MicroBatcher.submit`` and
blocks; ONE engine thread owns the model and runs the subjects of several jobs as one engine call, then every task
thread goes on with its own results (commit, result, ack).

Interactive work goes first: submissions of background work (bulk enrolment children, re-enrolment chunks; see
``delivery_attempt``) are considered only after every interactive submission, both when choosing which lane runs
next and when filling a batch, so a verify that arrives while bulk work is pending runs in the next batch.

A batch (per lane, i.e. per job type) is run when one of these holds:

- it holds ``max_images`` images (whole submissions, oldest first: a submission is never split);
- nothing more can arrive for its lane: no engine task of this process is still preparing work for the lane
  (download, decode, align) and no message waits on the broker for a free task slot. A lone job on an idle worker, or
  a prefork child, is never delayed;
- the oldest submission has waited ``mate_wait_s`` while tasks of this process are still preparing work for the lane
  (they will arrive: only their own preparation time is waited for, so this bound may be long), or
  ``fill_timeout_s`` while only messages on the broker could join (short: they may be taken by another worker).

The engine thread runs one batch at a time, so these rules only decide when an IDLE engine starts a partial batch;
while a batch runs, the next one fills by itself.

Isolation: if a batched call raises, each submission of the batch is run again alone, so only the one that fails
alone gets the error. A submission marked ``alone`` (a re-delivered message: its previous delivery crashed, maybe
taking its batch with it) always runs in a batch of its own.

Shapes (what ``engine_batch`` passes to the engine): items are ``(faces (N, 3, R, R) float in [-1, 1], seed 32 B)``
per subject; results are the engine's per-subject results, in item order. Seeds live only in the submissions'
memory; nothing here logs items or results.

The threads pool does not enforce Celery's time limits; ``Watchdog`` does: a task or a batch running past the hard
limit makes the process exit, so every message it holds (unacknowledged, acks late) is re-delivered after the
broker's visibility timeout, as for a SIGKILLed worker.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from worker.service.engine import LoadedEngine
    from worker.tasks.runtime import Runtime

log = logging.getLogger(__name__)

WATCHDOG_EXIT_STATUS = 70


def pack(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices of whole members, in order, packed greedily into groups of at most ``limit`` (a member bigger than
    ``limit`` forms a group of its own). Same rule as ``worker.algorithm.pipeline.pack_subjects``."""
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(sizes):
        if groups and size + n <= limit and groups[-1]:
            groups[-1].append(i)
            size += n
        else:
            groups.append([i])
            size = n
    return groups


# --- which tasks are running in this process ---------------------------------------------------------------------
class Coming(NamedTuple):
    """Engine work that may still join a batch: ``preparing`` maps a lane to the tasks of this process that will
    submit to it and have not yet; ``queued`` counts messages on the broker that this process has free task slots
    for (their lane is not known until they run)."""

    preparing: dict[str, int]
    queued: int = 0


class InFlight:
    """Tasks running in this process (keyed by thread): which of them will still submit engine work, to which lane,
    and when the oldest started (for the watchdog). Fed by Celery's ``task_prerun`` / ``task_postrun`` signals and
    by ``run_engine`` (a task stops preparing when it submits)."""

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


# --- the batcher ----------------------------------------------------------------------------------------------------
def _batch_scope(batch: list[_Submission]) -> Any:
    """The log scope of a batch's lines: its jobs' IDs and tenants (comma-joined when several)."""
    from worker.observability import job_scope

    jobs = [s.job for s in batch if s.job is not None]
    if not jobs:
        return contextlib.nullcontext()
    tenants = sorted({t for _, _, t in jobs})
    return job_scope(",".join(j for j, _, _ in jobs), batch[0].lane, ",".join(tenants))


@dataclass(eq=False)
class _Submission:
    lane: str
    items: list[Any]
    size: int
    alone: bool
    enqueued: float
    background: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: list[Any] | None = None
    error: BaseException | None = None
    job: tuple[str, str, str] | None = None
    """The submitting job's log scope (job ID, job type, tenant): the batch's lines carry it."""


class MicroBatcher:
    """Runs the submissions of many threads as few calls of ``run_batch(lane, items) -> results`` (one result per
    item, in order) on one engine thread. See the module docstring for when a batch starts.

    ``size_of(item)``: images in an item (default ``len(item[0])``); ``expected()``: the work that may still come
    (None: unknown, wait for the cap or the fill timeout); ``mate_wait_s``: how long the oldest submission waits for
    batch mates still being prepared in this process (default: ``fill_timeout_s``); ``merge=False``: one submission
    per call (batching off, the old behaviour, still on the one engine thread).
    """

    def __init__(
        self,
        run_batch: Callable[[str, list[Any]], list[Any]],
        *,
        max_images: int,
        fill_timeout_s: float,
        size_of: Callable[[Any], int] | None = None,
        expected: Callable[[], Coming] | None = None,
        mate_wait_s: float | None = None,
        merge: bool = True,
        clock: Callable[[], float] = time.monotonic,
        name: str = "engine-batcher",
    ) -> None:
        if max_images < 1 or fill_timeout_s < 0 or (mate_wait_s is not None and mate_wait_s < 0):
            raise ValueError("max_images must be >= 1, fill_timeout_s and mate_wait_s >= 0")
        self._run_batch = run_batch
        self.max_images = max_images
        self.fill_timeout_s = fill_timeout_s
        self.mate_wait_s = fill_timeout_s if mate_wait_s is None else mate_wait_s
        self._size_of = size_of or (lambda item: len(item[0]))
        self._expected = expected
        self._merge = merge
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._pending: list[_Submission] = []
        self._running_since: float | None = None
        self._closed = False
        self._changes = 0  # bumped (under the lock) by every submission and wake-up
        self._thread: threading.Thread | None = None

    # --- task-thread side -------------------------------------------------------------------------------------------
    def submit(self, lane: str, items: list[Any], *, alone: bool = False, background: bool = False) -> list[Any]:
        """Queue ``items`` (one job's subjects) and block until their results are ready (or re-raise the error their
        engine call raised when run alone). ``background``: runs only after the interactive submissions pending."""
        if not items:
            return []
        from worker.observability import current_job

        size = sum(self._size_of(it) for it in items)
        sub = _Submission(lane, list(items), size, alone, self._clock(), background, job=current_job())
        with self._cond:
            if self._closed:
                raise RuntimeError("engine batcher is closed")
            self._ensure_thread()
            self._pending.append(sub)
            self._changes += 1
            self._cond.notify_all()
        sub.done.wait()
        if sub.error is not None:
            raise sub.error
        assert sub.result is not None
        return sub.result

    def wakeup(self) -> None:
        """Re-check whether a batch can start (the number of tasks in flight changed)."""
        with self._cond:
            self._changes += 1
            self._cond.notify_all()

    def running_since(self) -> float | None:
        """Clock time at which the batch now running started (None: idle)."""
        return self._running_since

    def close(self) -> None:
        """Stop the engine thread once the pending submissions have run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- engine-thread side -----------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _next(self, coming: Coming | None) -> tuple[list[_Submission] | None, float]:
        """The batch to run now, lanes taken in the order of their oldest interactive submission, then of their
        oldest background one (None: no lane is ready), and otherwise how long to wait at most before checking again.
        A lane waiting for batch mates never holds back another lane's batch that is ready."""
        wait = float("inf")
        lanes: set[str] = set()
        order = sorted(self._pending, key=lambda sub: sub.background)  # stable: arrival order within each class
        for first in order:
            if first.alone or not self._merge:
                return [first], 0.0
            if first.lane in lanes:
                continue
            lanes.add(first.lane)
            batch, full = self._collect(first, order)
            w = self._wait_s(batch, full, coming)
            if w <= 0:
                return batch, 0.0
            wait = min(wait, w)
        return None, wait

    def _collect(self, first: _Submission, order: list[_Submission]) -> tuple[list[_Submission], bool]:
        """The batch of ``first``'s lane (``first``: its first submission in ``order``, interactive before
        background): whole submissions in that order up to ``max_images``; and whether it is as full as it can get
        (cap reached, or the next submission of the lane does not fit)."""
        batch, size = [first], first.size
        for sub in order[order.index(first) + 1 :]:
            if sub.lane != first.lane or sub.alone:
                continue
            if size + sub.size > self.max_images:
                return batch, True
            batch.append(sub)
            size += sub.size
        return batch, size >= self.max_images

    def _wait_s(self, batch: list[_Submission], full: bool, coming: Coming | None) -> float:
        """0 when ``batch`` should run now, else how long to wait at most before checking again."""
        if full or self._closed:
            return 0.0
        if coming is None:
            limit = self.fill_timeout_s
        elif coming.preparing.get(batch[0].lane, 0) > 0:
            limit = max(self.fill_timeout_s, self.mate_wait_s)  # batch mates are on their way in this process
        elif coming.queued > 0:
            limit = self.fill_timeout_s
        else:
            return 0.0  # nothing more can arrive for this lane
        return max(0.0, batch[0].enqueued + limit - self._clock())

    def _loop(self) -> None:
        while True:
            with self._cond:
                seen, ask = self._changes, self._expected is not None and bool(self._pending)
            # outside the lock: it may ask the broker (``engine_batcher``), and submitters must not wait for that
            coming = self._expected() if ask and self._expected is not None else None
            with self._cond:
                if not self._pending:
                    if self._closed:
                        return
                    self._cond.wait()
                    continue
                if self._expected is not None and (coming is None or self._changes != seen):
                    continue  # work arrived or a task stopped while ``expected`` was asked: ask again
                batch, wait = self._next(coming)
                if batch is None:
                    self._cond.wait(wait)
                    continue
                for sub in batch:
                    self._pending.remove(sub)
                self._running_since = self._clock()
                waited = self._running_since - batch[0].enqueued
            with _batch_scope(batch):
                cpu, wall = time.thread_time(), time.perf_counter()
                try:
                    self._run(batch)
                finally:
                    self._running_since = None
                log.info(
                    "engine batch: %s, %d jobs, %d images, %.2f s, %.2f CPU s, oldest job waited %.1f ms",
                    batch[0].lane,
                    len(batch),
                    sum(s.size for s in batch),
                    time.perf_counter() - wall,
                    time.thread_time() - cpu,
                    waited * 1000.0,
                )

    def _run(self, batch: list[_Submission]) -> None:
        lane = batch[0].lane
        try:
            results = self._call(lane, [it for sub in batch for it in sub.items])
        except BaseException as e:  # delivered to the submitters; this thread must live on
            if len(batch) == 1:
                self._deliver(batch[0], error=e)
                return
            log.warning("engine batch of %d jobs failed (%s): running them one by one", len(batch), type(e).__name__)
            for sub in batch:
                try:
                    self._deliver(sub, result=self._call(lane, sub.items))
                except BaseException as e1:
                    self._deliver(sub, error=e1)
            return
        start = 0
        for sub in batch:
            self._deliver(sub, result=results[start : start + len(sub.items)])
            start += len(sub.items)

    def _call(self, lane: str, items: list[Any]) -> list[Any]:
        out = list(self._run_batch(lane, items))
        if len(out) != len(items):
            raise RuntimeError(f"engine batch returned {len(out)} results for {len(items)} items")
        return out

    @staticmethod
    def _deliver(sub: _Submission, *, result: list[Any] | None = None, error: BaseException | None = None) -> None:
        sub.result, sub.error = result, error
        sub.done.set()


# --- hard time limit for pools that do not enforce one --------------------------------------------------------------
def _exit_process() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_STATUS)


class Watchdog:
    """Exits the process (``on_overrun``) when a task, or an engine batch, has run longer than ``limit_s``.

    Threads cannot be killed, so this is the threads pool's hard time limit: the unacknowledged messages of the
    process go back to the queue after the visibility timeout, and each counts one more attempt when it starts.
    """

    def __init__(
        self,
        limit_s: float,
        sources: list[Callable[[], float | None]],
        *,
        on_overrun: Callable[[], None] = _exit_process,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_s = limit_s
        self._sources = sources
        self._on_overrun = on_overrun
        self._interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        """True (and ``on_overrun`` called) when something runs past the limit."""
        starts = [t for t in (src() for src in self._sources) if t is not None]
        if starts and self._clock() - min(starts) > self.limit_s:
            log.critical(
                "a task or engine batch ran longer than the hard time limit (%.0f s): exiting the worker process so "
                "that its unacknowledged messages are re-delivered",
                self.limit_s,
            )
            self._on_overrun()
            return True
        return False

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self.check():
                return


# --- wiring: this process's engine batcher ---------------------------------------------------------------------------
_lock = threading.Lock()
_current: tuple[int, Any, Any, MicroBatcher] | None = None  # (pid, runtime, loaded engine, batcher)


def engine_batch(loaded: Any, lane: str, items: list[Any]) -> list[Any]:
    """One engine call for the subjects of a batch: packed by ``max_batch_images`` (normally one pack, since the
    batcher already respects the cap; a reenrolment chunk may need several), each pack through
    ``worker.service.enrol.run_engine`` (the engine call with its metrics)."""
    from worker.service.enrol import run_engine as engine_call

    results: list[Any] = []
    for group in pack([int(f.shape[0]) for f, _ in items], int(loaded.engine.config.max_batch_images)):
        results.extend(engine_call(loaded, [items[i] for i in group], lane))
    return results


def engine_batcher(rt: Runtime, loaded: LoadedEngine) -> MicroBatcher:
    """The batcher of this process for ``loaded`` (created on first use, after any fork)."""
    global _current
    with _lock:
        cur = _current
        if cur is not None and cur[0] == os.getpid() and cur[1] is rt and cur[2] is loaded:
            return cur[3]
        if cur is not None and cur[0] == os.getpid():
            cur[3].close()
            INFLIGHT.unlisten(cur[3].wakeup)
        s = rt.settings.engine
        batcher = MicroBatcher(
            lambda lane, items: engine_batch(loaded, lane, items),
            max_images=int(loaded.engine.config.max_batch_images),
            fill_timeout_s=float(s.batch_fill_timeout_ms) / 1000.0,
            mate_wait_s=float(s.batch_mate_wait_ms) / 1000.0,
            expected=lambda: expected_submitters(rt),
            merge=bool(s.micro_batching),
        )
        INFLIGHT.listen(batcher.wakeup)
        _current = (os.getpid(), rt, loaded, batcher)
        return batcher


def expected_submitters(rt: Runtime) -> Coming:
    """Engine work that will reach the batcher soon: the tasks of this process still preparing theirs (per lane),
    and as many messages waiting on the engine queue as this process has free task slots (a burst's first messages
    start before the consumer has fetched the rest)."""
    from worker.broker.config import ENGINE_QUEUES

    queued = 0
    free = INFLIGHT.free_slots()
    if free > 0 and INFLIGHT.capacity > 1:
        try:
            queued = min(free, sum(int(rt.redis.llen(q)) for q in ENGINE_QUEUES))
        except Exception:  # broker unreachable: the fill timeout still bounds the wait
            pass
    return Coming(INFLIGHT.preparing(), queued)


def current_batcher() -> MicroBatcher | None:
    """This process's batcher, if one was created (for the watchdog)."""
    cur = _current
    return cur[3] if cur is not None and cur[0] == os.getpid() else None


def run_engine(rt: Runtime, loaded: LoadedEngine, items: list[tuple[Any, bytes]], job_type: str) -> list[Any]:
    """``worker.service.enrol.run_engine`` through this process's batcher: ``[(faces (N, 3, R, R), seed)]`` ->
    one enrolment result per subject, in order (a re-delivered job's subjects run alone)."""
    b = engine_batcher(rt, loaded)
    INFLIGHT.submitting()
    return b.submit(job_type, items, alone=_ATTEMPT.get() > 1, background=_BACKGROUND.get())
