"""Pipelined publishing: many ``send_task`` calls, one Redis round trip per batch (imports neither torch nor boto3).

``with pipelined(app) as producer:`` then ``app.send_task(..., producer=producer)`` as usual. Every message is built
by Celery exactly as without the batch (same protocol-2 envelope, headers, properties, routing); only the final
``LPUSH`` goes into kombu's publish batch (``Producer.batch``: a non-transactional Redis pipeline, executed every
``batch`` messages and when the block ends). kombu's Redis channel also reads the exchange's binding table
(``SMEMBERS _kombu.binding.<exchange>``) for every message it routes; inside the block that table is read once per
exchange (bindings do not change while a batch is built), so a batch costs one round trip, not one per message.

An exception inside the block discards the messages not yet flushed (kombu's semantics): the caller re-sends them,
which is harmless for jobs with deterministic IDs. A failed flush raises ``kombu.exceptions.BatchPublishError``
(delivery of that batch is uncertain: re-send it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PUBLISH_BATCH = 500  # messages per Redis round trip


@contextmanager
def pipelined(app: Any, batch: int = PUBLISH_BATCH) -> Iterator[Any]:
    """A kombu producer whose publishes are pipelined ``batch`` at a time; flushed when the block ends."""
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        original = channel.get_table
        tables: dict[str, Any] = {}

        def get_table(exchange: str) -> Any:
            if exchange not in tables:
                tables[exchange] = original(exchange)
            return tables[exchange]

        channel.get_table = get_table  # instance attribute: shadows the method for this block only
        try:
            with producer.batch(max_size=batch):
                yield producer
        finally:
            try:
                del channel.get_table
            except AttributeError:  # pragma: no cover - the channel was replaced meanwhile
                pass


def short_argsrepr(kind: str, job_id: str) -> str:
    """What Celery shows for a job's arguments (``argsrepr`` header): kind and ID only. Celery's default is a
    ``saferepr`` of the whole job (up to 1 KiB more per queued message, ~100 us per message to build, and subjects and
    image references copied into every place Celery prints it)."""
    return f"[<{kind} job {job_id}>]"


class MessageTemplate:
    """Raw Redis list items for one task name and queue, built without a Celery round trip per message.

    One message is built by ``app.send_task`` itself (captured before it reaches Redis); every further message is that
    envelope with the per-message fields replaced: task ID (``id``, ``root_id``, ``correlation_id``), ``argsrepr``,
    the ``sent_at`` header, the body and kombu's ``delivery_tag`` (``argsrepr`` also sits in the properties: Celery
    copies ``send_task``'s options there). The constructor checks that a re-rendering of the captured message
    reproduces it exactly and that the task ID appears nowhere else, so a Celery/kombu upgrade that changes the
    envelope raises ``TemplateMismatch`` (callers fall back to ``send_task``) instead of sending something
    else. Inside a task, Celery's parent/root IDs (the sending task's) are the same for every message. ``kwargs`` and
    ``headers`` are fixed per template (a ``sent_at`` header is set per message). No countdown/expiry."""

    def __init__(
        self,
        app: Any,
        name: str,
        queue: str,
        sample_id: str,
        sample_args: list[Any],
        argsrepr: str,
        kwargs: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        import base64
        import json

        from kombu.serialization import dumps as kdumps

        captured: list[tuple[str, dict[str, Any]]] = []
        if not is_celery_send_task(app):
            raise TemplateMismatch("app.send_task is wrapped or replaced: every message goes through it")
        unknown = _unknown_publish_hooks(name)
        if unknown:
            raise TemplateMismatch(f"publish signal receivers that may change each message: {unknown}")
        sent_at = 1.0
        with app.producer_or_acquire() as producer:
            channel = producer.channel
            channel._put = lambda q, m, **kw: captured.append((q, m))  # shadow: capture instead of LPUSH
            try:
                app.send_task(
                    name,
                    args=sample_args,
                    kwargs=kwargs,
                    task_id=sample_id,
                    queue=queue,
                    ignore_result=True,
                    headers={**headers, "sent_at": sent_at} if headers and "sent_at" in headers else headers,
                    argsrepr=argsrepr,
                    producer=producer,
                    retry=False,
                )
            finally:
                del channel._put
            if len(captured) != 1:
                raise TemplateMismatch(f"{len(captured)} messages captured")
            ((qname, message),) = captured
            self.key: str = channel._q_for_pri(qname, channel._get_message_priority(message, reverse=False))
            self._next_tag = channel._next_delivery_tag
        self._kdumps = kdumps
        self._b64 = base64.b64encode
        self._json = json.dumps
        self._template = message
        body = json.loads(base64.b64decode(message["body"]))
        if not (isinstance(body, list) and len(body) == 3 and body[0] == sample_args):
            raise TemplateMismatch("unexpected body layout")
        self._tail = body[1:]  # kwargs, embed
        h, p = message["headers"], message["properties"]
        self._sent_at = "sent_at" in h  # per message: ours, or stamped by worker.metrics.stamp_sent_at
        if self._sent_at:
            sent_at = h["sent_at"]
        if h.get("id") != sample_id or p.get("correlation_id") != sample_id:
            raise TemplateMismatch("task ID not where expected")
        self._root_is_id = h.get("root_id") == sample_id  # no parent task; else the sender's root, the same for all
        if h.get("eta") or h.get("expires") or h.get("parent_id") == sample_id:
            raise TemplateMismatch("ETA or expiry: not for templates")
        again = self.render(sample_id, sample_args, argsrepr, sent_at, _tag=p["delivery_tag"])
        if json.loads(again) != json.loads(self._kdumps_message(message)):
            raise TemplateMismatch("re-rendering differs from Celery's message")
        bare = {**message, "body": "", "headers": {**h, "id": "", "argsrepr": ""}}
        if self._root_is_id:
            bare["headers"]["root_id"] = ""
        bare["properties"] = {**p, "correlation_id": "", "delivery_tag": "", "argsrepr": ""}
        if sample_id in json.dumps(bare):
            raise TemplateMismatch("task ID in an unexpected field")

    @staticmethod
    def _kdumps_message(message: dict[str, Any]) -> str:
        from kombu.utils.json import dumps

        return str(dumps(message))

    def render(
        self, task_id: str, args: list[Any], argsrepr: str, sent_at: float | None = None, _tag: str | None = None
    ) -> str:
        """The raw list item ``app.send_task`` would push for this task."""
        from kombu.utils.json import dumps

        t = self._template
        _, _, data = self._kdumps((args, *self._tail), serializer="json")
        headers = {**t["headers"], "id": task_id, "argsrepr": argsrepr}
        if self._root_is_id:
            headers["root_id"] = task_id
        if self._sent_at:
            headers["sent_at"] = time.time() if sent_at is None else sent_at
        props = {**t["properties"], "correlation_id": task_id, "delivery_tag": _tag or self._next_tag()}
        if "argsrepr" in props:  # send_task copies its options into the properties as well
            props["argsrepr"] = argsrepr
        props["delivery_info"] = dict(t["properties"]["delivery_info"])
        body = self._b64(data.encode("utf-8") if isinstance(data, str) else data).decode("ascii")
        return str(dumps({**t, "body": body, "headers": headers, "properties": props}))


KNOWN_PUBLISH_HOOKS = frozenset({"stamp_sent_at"})  # worker.metrics: sets the ``sent_at`` header if absent


def _unknown_publish_hooks(name: str) -> list[str]:
    """Receivers of Celery's publish signals other than the ones whose effect the template reproduces."""
    from celery import signals

    out = []
    for sig in (signals.before_task_publish, signals.after_task_publish):
        for r in sig._live_receivers(sender=name):
            label = getattr(r, "__name__", repr(r))
            if label not in KNOWN_PUBLISH_HOOKS:
                out.append(label)
    return out


def is_celery_send_task(app: Any) -> bool:
    """Whether ``app.send_task`` is Celery's own (not wrapped or replaced: then every message must go through it)."""
    return getattr(app.send_task, "__func__", None) is getattr(type(app), "send_task", None)


class TemplateMismatch(RuntimeError):
    """Celery's envelope is not what ``MessageTemplate`` knows how to reproduce."""
