"""The order in which a worker polls its queues: interactive engine work first, bulk engine work last.

kombu's Redis transport asks Redis with one ``BRPOP q1 q2 ...``, which pops from the first non-empty list in the
order given. Its default ``round_robin`` strategy rotates that order after every message, so a worker consuming
``engine.interactive`` and ``engine.bulk`` would take one of each in turn, and a verify could wait behind a bulk
job's backlog. ``QueueOrder`` (the ``queue_order_strategy`` broker transport option, ``worker.broker.config``) keeps
one fixed order, ``WORKER_QUEUE_ORDER``, whatever order ``-Q`` lists the queues in; queues it does not know keep
their ``-Q`` order, after the known ones.

A worker holds the messages it has reserved (one per task slot with prefetch 1), and a background task holds its
slot while its engine work waits behind other batches. So an engine worker keeps slots for interactive work: while
``gate_background``'s check says no (the threads pool's engine worker: ``worker.interactive_slots`` of its slots are
left to interactive work), the bulk queue is left out of the ``BRPOP`` and its messages stay in Redis. A verify then
finds a free slot at once and waits at most for the engine batch that runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kombu.utils.scheduling import priority_cycle

from worker.broker.config import ENGINE_BULK_QUEUE, WORKER_QUEUE_ORDER

_RANK = {q: i for i, q in enumerate(WORKER_QUEUE_ORDER)}
_admit_background: Callable[[], bool] | None = None


def gate_background(admit: Callable[[], bool] | None) -> None:
    """Install (None: remove) this process's check of whether it may take one more message from the bulk engine
    queue now; asked before every ``BRPOP`` (at least once a second)."""
    global _admit_background
    _admit_background = admit


def ordered(queues: Iterable[str]) -> list[str]:
    """``queues`` in polling order: known queues by ``WORKER_QUEUE_ORDER``, others after them in their own order."""
    given = list(dict.fromkeys(queues))
    return sorted(given, key=lambda q: (_RANK.get(q, len(_RANK)), given.index(q)))


class QueueOrder(priority_cycle):  # type: ignore[misc]
    """kombu cycle: a fixed polling order (``ordered``), never rotated."""

    def update(self, it: Iterable[str]) -> None:
        self.items[:] = ordered(it)

    def consume(self, n: int) -> list[str]:
        """The first ``n`` queues in polling order, without the bulk engine queue while the gate is closed (never an
        empty list: a worker of the bulk queue alone always polls it)."""
        queues: list[str] = self.items[:n]
        admit = _admit_background
        if admit is not None and ENGINE_BULK_QUEUE in queues and not admit():
            return [q for q in queues if q != ENGINE_BULK_QUEUE] or queues
        return queues
