"""Publishing many task messages, one Redis round trip per batch (imports neither torch nor boto3).

``BatchSender`` is the one way the project sends many messages (``producers.Client.submit_many``, a bulk job's enrol
children in ``worker.tasks.control_tasks``): per (task name, queue) a ``MessageTemplate`` made from one message Celery
itself built renders every further message as bytes (one JSON encode of the task's argument, a base64 and a bytes
format per message), and the items go out as one hand-packed ``LPUSH`` per queue (``worker.storage.resp``). Where a
template is refused (``send_task`` wrapped, publish hooks, an envelope it cannot reproduce) the messages go through
``send_task`` inside ``pipelined``.

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

import json
import logging
import os
import re
import time
import uuid
from base64 import b64encode as _b64
from binascii import hexlify
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from json.encoder import encode_basestring_ascii as _escape  # type: ignore[attr-defined]
from operator import itemgetter
from typing import Any

log = logging.getLogger(__name__)

PUBLISH_BATCH = 500  # messages per Redis round trip

Outgoing = tuple[str, str, str, Any, str]
"""One message for ``BatchSender``: (task name, queue, task ID, the task's one positional argument, argsrepr)."""


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

    One message is built by ``app.send_task`` itself (captured before it reaches Redis). Its JSON, as kombu encodes
    it, is kept as a format string with holes for the per-message fields: task ID (``id``, ``root_id``,
    ``correlation_id``), ``argsrepr`` (also in the properties: Celery copies ``send_task``'s options there), the
    ``sent_at`` header, the body and kombu's ``delivery_tag``. A message is that string with the holes filled
    (JSON-escaped): one JSON encode of the task's arguments, a base64 of the body, no encoding of the envelope.

    The constructor checks that filling the holes with the captured values reproduces Celery's list item byte for
    byte and that the task ID appears nowhere else, so a Celery/kombu upgrade that changes the envelope raises
    ``TemplateMismatch`` (callers fall back to ``send_task``) instead of sending something else. Inside a task,
    Celery's parent/root IDs (the sending task's) are the same for every message. ``kwargs`` and ``headers`` are fixed
    per template (a ``sent_at`` header is set per message). No countdown, expiry or queue expiry."""

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

        from kombu.utils.json import dumps as kdumps

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
            if getattr(channel, "_expires", None) and qname in channel._expires:
                raise TemplateMismatch("queue with an expiry: kombu sends PEXPIRE with each message")
            if getattr(channel, "global_keyprefix", ""):
                raise TemplateMismatch("a global key prefix: kombu's client prefixes every key")
            self.key: str = channel._q_for_pri(qname, channel._get_message_priority(message, reverse=False))
        h, p = message["headers"], message["properties"]
        if p.get("body_encoding") != "base64" or message.get("content-type") != "application/json":
            raise TemplateMismatch("body not base64-encoded JSON")
        body = json.loads(base64.b64decode(message["body"]))
        if not (isinstance(body, list) and len(body) == 3 and body[0] == sample_args):
            raise TemplateMismatch("unexpected body layout")
        if h.get("id") != sample_id or p.get("correlation_id") != sample_id:
            raise TemplateMismatch("task ID not where expected")
        if h.get("argsrepr") != argsrepr or p.get("argsrepr", argsrepr) != argsrepr:
            raise TemplateMismatch("argsrepr not where expected")
        if h.get("eta") or h.get("expires") or h.get("parent_id") == sample_id:
            raise TemplateMismatch("ETA or expiry: not for templates")
        probe = 'é"\\\x01/<>'
        if kdumps(probe) != _escape(probe) or kdumps([sample_args, 0.1]) != json.dumps([sample_args, 0.1]):
            raise TemplateMismatch("kombu's JSON is not the standard library's")

        # the body: "[" + the arguments' JSON + the rest (kwargs and Celery's embed, fixed per template)
        mark = _hole("args")
        head, tail = _split_once(str(kdumps([mark, *body[1:]])), _escape(mark))

        # the envelope: kombu's JSON of the message with a hole in every per-message field
        holes: dict[str, str] = {}

        def hole(field: str) -> str:
            s = _hole(field)
            holes[s] = field
            return s

        hh = {**h, "id": hole("id"), "argsrepr": hole("argsrepr")}
        self._root_is_id = h.get("root_id") == sample_id  # no parent task; else the sender's root, the same for all
        if self._root_is_id:
            hh["root_id"] = hole("id")
        self._sent_at = "sent_at" in h  # per message: ours, or stamped by worker.metrics.stamp_sent_at
        if self._sent_at:
            if not isinstance(h["sent_at"], float):
                raise TemplateMismatch("sent_at header is not a float")
            hh["sent_at"] = hole("sent_at")
        pp = {**p, "correlation_id": hole("id"), "delivery_tag": hole("tag")}
        if "argsrepr" in p:  # send_task copies its options into the properties as well
            pp["argsrepr"] = hole("argsrepr")
        text = str(kdumps({**message, "body": hole("body"), "headers": hh, "properties": pp}))
        tokens = {}  # what each hole is replaced by; body and tag keep their quotes (base64 and a UUID: no escapes)
        for s, field in holes.items():
            token = s if field in ("body", "tag") else _escape(s)
            if text.count(token) != 1:
                raise TemplateMismatch(f"field {field} not found once")
            tokens[token] = field
        split = re.compile("|".join(re.escape(t) for t in tokens))
        parts = split.split(text)
        if sample_id in "".join(parts):
            raise TemplateMismatch("task ID in an unexpected field")
        try:
            self._format = "%s".join(part.replace("%", "%%") for part in parts).encode("ascii")
        except UnicodeEncodeError:
            raise TemplateMismatch("kombu's JSON is not ASCII") from None
        order = [_FIELDS.index(tokens[t]) for t in split.findall(text)]
        self._pick = itemgetter(*order)  # the per-message values in the order of the holes (always several)
        try:
            self._body_head, self._body_tail = head.encode("ascii"), tail.encode("ascii")
        except UnicodeEncodeError:
            raise TemplateMismatch("kombu's JSON is not ASCII") from None
        again = self.render(sample_id, sample_args, argsrepr, h.get("sent_at"), p["delivery_tag"])
        if again != kdumps(message):
            raise TemplateMismatch("re-rendering differs from Celery's message")

    def render(
        self, task_id: str, args: list[Any], argsrepr: str, sent_at: float | None = None, tag: str | None = None
    ) -> str:
        """The raw list item ``app.send_task`` would push for this task (``tag``: kombu's delivery tag, a UUID4
        string; a new one by default)."""
        when = repr(float(time.time() if sent_at is None else sent_at)).encode()
        delivery_tag = tag.encode() if tag else delivery_tags(1)[0]
        return self.item(task_id, _dumps(args), argsrepr, when, delivery_tag).decode("ascii")

    def item(self, task_id: str, args_json: str, argsrepr: str, sent_at: bytes, tag: bytes) -> bytes:
        """``render`` as the bytes pushed, given the arguments' JSON (``json.dumps(args)``), the send time (``repr``
        of the float) and the delivery tag."""
        body = _b64(self._body_head + args_json.encode() + self._body_tail)
        return self._format % self._pick((body, _escape(task_id).encode(), _escape(argsrepr).encode(), sent_at, tag))


_FIELDS = ("body", "id", "argsrepr", "sent_at", "tag")  # the per-message values, in the order ``item`` passes them


class BatchSender:
    """Sends many task messages with one Redis round trip per ``send``: the producer's ``submit_many`` and a fan-out
    task's children (``worker.tasks.control_tasks``) alike.

    A message is ``(task name, queue, task ID, argument, argsrepr)``: the task gets ``argument`` (a JSON-compatible
    dict) as its one positional argument, plus this sender's ``kwargs``, with Celery's result ignored. Each (task
    name, queue) gets a ``MessageTemplate``, built from the first message sent to it; the list items are pushed with
    one ``LPUSH`` per queue, in order, all in one write. When Celery's envelope is not what a template reproduces
    (``send_task`` wrapped, signal receivers, an upgrade), those messages go through ``send_task`` inside one
    publish batch instead. ``sent_at``: set the ``sent_at`` header (the send time; the queue-age metrics read it)."""

    def __init__(
        self, app: Any, *, kwargs: dict[str, Any] | None = None, sent_at: bool = False, retry: bool | None = None
    ) -> None:
        self.app = app
        self.kwargs = kwargs
        self.sent_at = sent_at
        self.retry = retry
        self._templates: dict[tuple[str, str], MessageTemplate | None] = {}
        self._pushes: dict[str, list[bytes]] = {}  # list key -> rendered items, until flush
        self._slow: list[Outgoing] = []

    def send(self, messages: Sequence[Outgoing]) -> None:
        """Publish ``messages`` (one Redis round trip; in order within each queue). An exception leaves the batch
        unsent or, when the pipeline fails part way, partly sent: re-send it (task IDs are deterministic)."""
        self.add(messages)
        self.flush()

    def add(self, messages: Sequence[Outgoing]) -> None:
        """Render ``messages`` for the next ``flush`` (nothing is sent yet). Building a large batch in several
        ``add`` calls keeps few objects alive at a time: the rendered items are bytes, which the garbage collector
        does not track, so it seldom runs (and never over everything the process holds)."""
        if not messages:
            return
        pushes = self._pushes
        templates = self._templates
        now = repr(time.time()).encode()
        dumps = _dumps
        for msg, tag in zip(messages, delivery_tags(len(messages)), strict=True):
            name, queue, task_id, arg, argsrepr = msg
            tpl = templates.get((name, queue), _MISSING)
            if tpl is _MISSING:
                tpl = self._template(msg)
            if tpl is None:
                self._slow.append(msg)
                continue
            items = pushes.get(tpl.key)
            if items is None:
                pushes[tpl.key] = items = []
            items.append(tpl.item(task_id, dumps([arg]), argsrepr, now, tag))

    def flush(self) -> None:
        """Send what ``add`` rendered: one ``LPUSH`` per queue in one round trip, then (rarely) the messages that go
        through ``send_task``."""
        pushes, slow = self._pushes, self._slow
        self._pushes, self._slow = {}, []
        if pushes:
            from worker.storage import resp

            cmds = [resp.pack_with((b"LPUSH", key.encode()), items, len(items)) for key, items in pushes.items()]
            with self.app.producer_or_acquire() as producer, producer.channel.conn_or_acquire() as client:
                resp.execute(client, cmds)
        if slow:
            self._send_task(slow)

    @property
    def refused(self) -> list[tuple[str, str]]:
        """(task name, queue) pairs whose messages go through ``send_task`` (their template was refused)."""
        return [k for k, tpl in self._templates.items() if tpl is None]

    def discard(self) -> None:
        """Drop what ``add`` rendered since the last ``flush``."""
        self._pushes, self._slow = {}, []

    def _template(self, msg: Outgoing) -> MessageTemplate | None:
        name, queue, task_id, arg, argsrepr = msg
        tpl: MessageTemplate | None
        try:
            tpl = MessageTemplate(
                self.app,
                name,
                queue,
                task_id,
                [arg],
                argsrepr,
                kwargs=self.kwargs,
                headers={"sent_at": 0.0} if self.sent_at else None,
            )
        except TemplateMismatch as e:
            tpl = None
            if is_celery_send_task(self.app):  # a wrapped send_task is deliberate: no news
                log.warning("message template for %s refused (%s); sending with send_task", name, e)
        self._templates[(name, queue)] = tpl
        return tpl

    def _send_task(self, messages: Sequence[Outgoing]) -> None:
        declared: set[str] = set()
        with pipelined(self.app, len(messages)) as producer:
            for name, queue, task_id, arg, argsrepr in messages:
                self.app.send_task(
                    name,
                    args=[arg],
                    kwargs=self.kwargs,
                    task_id=task_id,
                    queue=queue,
                    ignore_result=True,
                    headers={"sent_at": time.time()} if self.sent_at else None,
                    argsrepr=argsrepr,
                    producer=producer,
                    retry=self.retry,
                    **({"declare": []} if queue in declared else {}),  # each queue is declared (bound) once per batch
                )
                declared.add(queue)


_MISSING: Any = object()


def delivery_tags(n: int) -> list[bytes]:
    """``n`` random UUID4 strings, ASCII-encoded (kombu's delivery tags: ``str(uuid.uuid4())``), made a batch at a
    time: one ``urandom``, then each of the 36 columns of the strings filled for all ``n`` at once."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    h = hexlify(raw)
    out = bytearray(b"-" * (36 * n))
    for column, digit in _TAG_COLUMNS:
        out[column::36] = h[digit::32]
    tags = bytes(out)
    return [tags[i : i + 36] for i in range(0, 36 * n, 36)]


_TAG_COLUMNS = [(d + (d >= 8) + (d >= 12) + (d >= 16) + (d >= 20), d) for d in range(32)]  # 8-4-4-4-12 hex digits
_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))
_VARIANT = bytes(b & 0x3F | 0x80 for b in range(256))  # RFC 4122


def _not_json(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON")


def _json_encoder() -> Any:
    """``json.dumps`` with its defaults, without building an encoder per call: the C encoder made once (no circular
    check: the arguments are trees), when the interpreter has it and it gives the same text."""
    from json.encoder import c_make_encoder  # type: ignore[attr-defined]

    if c_make_encoder is None:  # pragma: no cover - interpreters without the C accelerator
        return json.dumps
    encode = c_make_encoder(None, _not_json, _escape, None, ": ", ", ", False, False, True)

    def dumps(obj: Any) -> str:
        return "".join(encode(obj, 0))

    probe = [{"a": [1, 2.5, -0.0, 1e-07, None, True, 'é"\\\n/'], "b": {}, "c": []}, "x"]
    try:
        return dumps if dumps(probe) == json.dumps(probe) else json.dumps
    except Exception:  # an interpreter whose encoder differs: the standard path
        return json.dumps


_encode_json: Callable[[Any], str] = _json_encoder()


def _dumps(obj: Any) -> str:
    """kombu's JSON of a JSON-compatible value (the standard library's C encoder; kombu's for anything else)."""
    try:
        return _encode_json(obj)
    except TypeError:
        from kombu.utils.json import dumps

        return str(dumps(obj))


def _hole(field: str) -> str:
    return f"@@{field}-{uuid.uuid4().hex}@@"


def _split_once(text: str, sep: str) -> tuple[str, str]:
    if text.count(sep) != 1:
        raise TemplateMismatch("marker not found once")
    head, _, tail = text.partition(sep)
    return head, tail


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
