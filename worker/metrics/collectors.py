"""Fleet collectors, read at scrape time: Celery queue depth and oldest-message age from Redis (``QueueCollector``,
aged by the ``sent_at`` header that ``stamp_sent_at`` puts on published messages) and the progress of open
revocation and bulk jobs (``ProgressCollector`` over ``ProgressSnapshot`` counts; no job ID leaves).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from worker.metrics.definitions import PREFIX, PROGRESS_KINDS, QUEUES, check_label

log = logging.getLogger(__name__)

__all__ = [
    "SENT_AT_HEADER",
    "ProgressCollector",
    "ProgressSnapshot",
    "ProgressSource",
    "QueueCollector",
    "open_job_snapshots",
    "stamp_sent_at",
]

SENT_AT_HEADER = "sent_at"


def stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """``before_task_publish`` receiver: stamp the publish time so the queue collector can age the oldest message."""
    if headers is not None and SENT_AT_HEADER not in headers:
        headers[SENT_AT_HEADER] = time.time()


# kombu's Redis transport keeps one list per priority step: "<queue>" and "<queue>\x06\x16<n>".
_PRIORITY_SEP = "\x06\x16"


class QueueCollector:
    """Queue depth and oldest-message age of the Celery queues in Redis, read at scrape time.

    kombu LPUSHes and BRPOPs, so the oldest message is the list's last element. Its age comes from the
    ``sent_at`` header (``stamp_sent_at``); a message without it is aged from when this collector first saw it.
    """

    def __init__(self, redis_client: Any, queues: Iterable[str] = QUEUES, clock: Callable[[], float] = time.time):
        self._redis = redis_client
        self._queues = tuple(check_label(q, QUEUES, "queue") for q in queues)
        self._clock = clock
        self._first_seen: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _lists(self, queue: str) -> list[str]:
        names = [queue]
        names += [f"{queue}{_PRIORITY_SEP}{p}" for p in range(1, 10)]
        return names

    def _oldest_age(self, name: str, raw: bytes | str | None, now: float) -> float:
        if raw is None:
            self._first_seen.pop(name, None)
            return 0.0
        try:
            msg = json.loads(raw)
            headers = msg.get("headers") or {}
            sent = headers.get(SENT_AT_HEADER)
            ident = str(headers.get("id") or msg.get("properties", {}).get("delivery_tag") or hash(raw))
        except (ValueError, AttributeError):
            sent, ident = None, str(hash(raw))
        if isinstance(sent, int | float) and sent > 0:
            return max(0.0, now - float(sent))
        seen = self._first_seen.get(name)
        if seen is None or seen[0] != ident:
            seen = (ident, now)
            self._first_seen[name] = seen
        return max(0.0, now - seen[1])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        length = GaugeMetricFamily(
            f"{PREFIX}_queue_length_messages",
            "Messages waiting in the Celery queue (not yet delivered).",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_message_age_seconds",
            "Age of the oldest waiting message (0 when the queue is empty).",
            labels=["queue"],
        )
        up = GaugeMetricFamily(f"{PREFIX}_redis_up", "1 when the broker answered the last queue scrape.")
        now = self._clock()
        try:
            with self._lock:
                for queue in self._queues:
                    lists = self._lists(queue)
                    pipe = self._redis.pipeline(transaction=False)
                    for name in lists:
                        pipe.llen(name)
                    for name in lists:
                        pipe.lindex(name, -1)
                    res = pipe.execute()
                    lens, tails = res[: len(lists)], res[len(lists) :]
                    oldest = max(self._oldest_age(name, t, now) for name, t in zip(lists, tails, strict=True))
                    length.add_metric([queue], float(sum(int(n) for n in lens)))
                    age.add_metric([queue], oldest)
        except Exception as exc:  # broker down: report it, never break the scrape
            log.warning("queue metrics: broker unreachable (%s)", type(exc).__name__)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield length
        yield age
        yield up


@dataclass(frozen=True)
class ProgressSnapshot:
    """Progress of one open revocation or bulk job (counts only; the job ID never leaves the source).

    ``done`` counts every finished item, succeeded or failed; ``failed`` is the failed part of ``done``.
    """

    kind: str
    done: int
    total: int
    failed: int = 0


ProgressSource = Callable[[], Iterable[ProgressSnapshot]]


def open_job_snapshots(book: Any) -> list[ProgressSnapshot]:
    """Progress of every open revoke/bulk job in ``book`` (a ``worker.storage.jobbook.JobBook``), for the metrics
    collector (counts only, no IDs leave)."""
    out = []
    for job_id in book.open_jobs():
        p = book.progress(job_id)
        if p.kind in ("revoke", "bulk"):
            out.append(ProgressSnapshot(kind=p.kind, done=p.done, total=p.total or 0, failed=p.failed))
    return out


class ProgressCollector:
    """Done/total items summed over all open revocation and bulk jobs, per kind; no job IDs in labels."""

    def __init__(self, source: ProgressSource):
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        open_jobs = GaugeMetricFamily(f"{PREFIX}_progress_open_jobs", "Open revocation / bulk jobs.", labels=["kind"])
        done = GaugeMetricFamily(
            f"{PREFIX}_progress_done_items",
            "Items finished (succeeded or failed), summed over open jobs.",
            labels=["kind"],
        )
        failed = GaugeMetricFamily(
            f"{PREFIX}_progress_failed_items", "Items failed (part of done), summed over open jobs.", labels=["kind"]
        )
        total = GaugeMetricFamily(
            f"{PREFIX}_progress_total_items", "Items expected, summed over open jobs.", labels=["kind"]
        )
        agg = {k: [0, 0, 0, 0] for k in PROGRESS_KINDS}
        try:
            for snap in self._source():
                row = agg[check_label(snap.kind, PROGRESS_KINDS, "progress kind")]
                row[0] += 1
                row[1] += int(snap.done)
                row[2] += int(snap.failed)
                row[3] += int(snap.total)
        except Exception as exc:
            log.warning("progress metrics: source failed (%s)", type(exc).__name__)
            return
        for kind, (n, d, f, t) in agg.items():
            open_jobs.add_metric([kind], n)
            done.add_metric([kind], d)
            failed.add_metric([kind], f)
            total.add_metric([kind], t)
        yield from (open_jobs, done, failed, total)
