"""Cross-job micro-batching of engine calls inside one engine worker process.

With the Celery ``threads`` pool every engine message still runs as its own task on its own thread (its own attempt
count, retries, dead letter, stored result and late ack, exactly as with the prefork pool). Each task thread does its
per-job work (key checks, download, decode, align, seed), then hands its subjects to ``MicroBatcher.submit`` and
blocks; ONE engine thread owns the model and runs the subjects of several jobs as one engine call, then every task
thread goes on with its own results (commit, result, ack). ``worker.tasks.runtime.WorkerRuntime.engine_call`` is
the submitting side; the engine call itself is whatever callable the batcher is given (in a worker:
``worker.service.engine.EngineCall``). This module knows nothing of the service, Celery or the broker.

Interactive work goes first: submissions of background work (bulk enrolment children, re-enrolment chunks; see
``worker.tasks.inflight.delivery_attempt``) are considered only after every interactive submission, both when
choosing which lane runs next and when filling a batch, so a verify that arrives while bulk work is pending runs in
the next batch. A batch of background work only is held back (at most ``mate_wait_s``) while a task of this process
is still preparing interactive work (a verify being downloaded and aligned), so that it does not start just before
the verify arrives. A job's submission of more than ``max_images`` images (a re-enrolment chunk of 50 subjects) is
split into packs of whole subjects, queued together: interactive work runs between its packs, and no engine call
is longer than one batch. ``background_max_images`` caps background work tighter: an engine whose images run one by
one anyway (``images_independent``: batching buys no speed) takes background work one subject at a time, so a verify
that arrives waits for at most one subject's images, never a whole batch of them; background work never joins a
batch beyond that cap, interactive batches included.

A batch (per lane, i.e. per job type) is run when one of these holds:

- it holds ``max_images`` images (whole packs, oldest first);
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

Shapes (what ``run_batch`` gets): items are ``(faces (N, 3, R, R) float in [-1, 1], seed 32 B)`` per subject;
results are the engine's per-subject results, in item order. Seeds live only in the submissions' memory; nothing
here logs items or results. A batch is never over ``max_images`` unless one submission alone is; ``run_batch``
packs such a batch itself.

The threads pool does not enforce Celery's time limits: ``worker.tasks.watchdog`` does, from the start time of the
oldest task and of the batch that runs (``MicroBatcher.running_since``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Coming(NamedTuple):
    """Engine work that may still join a batch: ``preparing`` maps a lane to the tasks of this process that will
    submit to it and have not yet; ``queued`` counts messages on the broker that this process has free task slots
    for (their lane is not known until they run)."""

    preparing: dict[str, int]
    queued: int = 0
    interactive: int = 0
    """Tasks of this process still preparing interactive work (enrol, verify): a background batch waits for them."""


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
    batch mates still being prepared in this process (default: ``fill_timeout_s``); ``background_max_images``: the
    most images of a batch that holds background work (default ``max_images``); ``merge=False``: one submission
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
        background_max_images: int | None = None,
        merge: bool = True,
        clock: Callable[[], float] = time.monotonic,
        name: str = "engine-batcher",
    ) -> None:
        if max_images < 1 or fill_timeout_s < 0 or (mate_wait_s is not None and mate_wait_s < 0):
            raise ValueError("max_images must be >= 1, fill_timeout_s and mate_wait_s >= 0")
        if background_max_images is not None and background_max_images < 1:
            raise ValueError("background_max_images must be >= 1")
        self._run_batch = run_batch
        self.max_images = max_images
        self.background_max_images = min(max_images, background_max_images or max_images)
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
        self._held_since: float | None = None  # background work held back for interactive work being prepared
        self._thread: threading.Thread | None = None

    # --- task-thread side -------------------------------------------------------------------------------------------
    def submit(self, lane: str, items: list[Any], *, alone: bool = False, background: bool = False) -> list[Any]:
        """Queue ``items`` (one job's subjects) and block until their results are ready (or re-raise the error their
        engine call raised when run alone). ``background``: runs only after the interactive submissions pending."""
        if not items:
            return []
        from worker.observability import current_job

        now, job = self._clock(), current_job()
        cap = self.background_max_images if background else self.max_images
        packs = self._packs(list(items), cap) if self._merge else [list(items)]
        subs = [
            _Submission(lane, p, sum(self._size_of(it) for it in p), alone, now, background, job=job) for p in packs
        ]
        with self._cond:
            if self._closed:
                raise RuntimeError("engine batcher is closed")
            self._ensure_thread()
            self._pending.extend(subs)
            self._changes += 1
            self._cond.notify_all()
        for sub in subs:
            sub.done.wait()
        for sub in subs:
            if sub.error is not None:
                raise sub.error
        return [r for sub in subs for r in (sub.result or [])]

    def _packs(self, items: list[Any], cap: int) -> list[list[Any]]:
        """Whole items, in order, in packs of at most ``cap`` images (an item over the cap alone)."""
        packs: list[list[Any]] = [[]]
        size = 0
        for it in items:
            n = self._size_of(it)
            if packs[-1] and size + n > cap:
                packs.append([])
                size = 0
            packs[-1].append(it)
            size += n
        return packs

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
                w = self._hold_s(batch, coming)
            if w <= 0:
                self._held_since = None
                return batch, 0.0
            wait = min(wait, w)
        return None, wait

    def _hold_s(self, batch: list[_Submission], coming: Coming | None) -> float:
        """How long a ready batch of background work only is held back for interactive work still being prepared
        in this process (0: run it). Bounded by ``mate_wait_s`` from the start of the hold."""
        if self._closed or coming is None or coming.interactive <= 0 or not all(s.background for s in batch):
            return 0.0
        now = self._clock()
        if self._held_since is None:
            self._held_since = now
        return max(0.0, self._held_since + self.mate_wait_s - now)

    def _collect(self, first: _Submission, order: list[_Submission]) -> tuple[list[_Submission], bool]:
        """The batch of ``first``'s lane (``first``: its first submission in ``order``, interactive before
        background): whole submissions in that order up to ``max_images``; and whether it is as full as it can get
        (cap reached, or the next submission of the lane does not fit). Background work joins only while the batch
        stays within ``background_max_images``."""
        batch, size = [first], first.size
        cap = self.background_max_images if first.background else self.max_images
        for sub in order[order.index(first) + 1 :]:
            if sub.lane != first.lane or sub.alone:
                continue
            if sub.background:
                cap = min(cap, self.background_max_images)
            if size + sub.size > cap:
                return batch, True
            batch.append(sub)
            size += sub.size
        return batch, size >= cap

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
            # outside the lock: it may ask the broker (``expected``), and submitters must not wait for that
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
