"""The order in which a worker polls its queues: interactive engine work first, bulk engine work last.

kombu's Redis transport asks Redis with one ``BRPOP q1 q2 ...``, which pops from the first non-empty list in the
order given. Its default ``round_robin`` strategy rotates that order after every message, so a worker consuming
``engine.interactive`` and ``engine.bulk`` would take one of each in turn, and a verify could wait behind a bulk
job's backlog. ``QueueOrder`` (the ``queue_order_strategy`` broker transport option, ``worker.broker.config``) keeps
one fixed order, ``WORKER_QUEUE_ORDER``, whatever order ``-Q`` lists the queues in; queues it does not know keep
their ``-Q`` order, after the known ones.

A worker still holds the messages it has reserved (one per task slot with prefetch 1): a verify waits at most for a
slot to free up, i.e. about one engine batch, not for the queue's backlog.
"""

from __future__ import annotations

from collections.abc import Iterable

from kombu.utils.scheduling import priority_cycle

from worker.broker.config import WORKER_QUEUE_ORDER

_RANK = {q: i for i, q in enumerate(WORKER_QUEUE_ORDER)}


def ordered(queues: Iterable[str]) -> list[str]:
    """``queues`` in polling order: known queues by ``WORKER_QUEUE_ORDER``, others after them in their own order."""
    given = list(dict.fromkeys(queues))
    return sorted(given, key=lambda q: (_RANK.get(q, len(_RANK)), given.index(q)))


class QueueOrder(priority_cycle):  # type: ignore[misc]
    """kombu cycle: a fixed polling order (``ordered``), never rotated."""

    def update(self, it: Iterable[str]) -> None:
        self.items[:] = ordered(it)
