"""The hard time limit of the threads pool, which does not enforce Celery's: ``Watchdog`` exits the process when a
task or an engine batch runs past the limit, so every message it holds (unacknowledged, acks late) is re-delivered
after the broker's visibility timeout, as for a SIGKILLed worker."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

WATCHDOG_EXIT_STATUS = 70


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
