"""``worker.broker.publish`` without a Redis: the list items a ``MessageTemplate`` renders are the ones Celery and
kombu build for the same task (kombu's in-memory transport, ``_put`` captured), and ``BatchSender`` pushes them in
order, one ``LPUSH`` per queue, through hand-packed Redis commands (a fake connection decodes what would be sent)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kombu.transport import memory
from kombu.utils.json import dumps as kombu_dumps

from worker.broker.publish import BatchSender, MessageTemplate, TemplateMismatch, delivery_tags, short_argsrepr
from worker.storage import resp

ENROLL = "cancelable.enroll"


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The producer's Celery app on kombu's in-memory transport (the Redis transport's list-key naming added)."""
    from celery import signals

    from worker.broker.config import make_celery
    from worker.metrics.collectors import stamp_sent_at
    from worker.settings import load_settings

    monkeypatch.setattr(memory.Channel, "_q_for_pri", lambda self, q, pri: q, raising=False)
    # a worker process's metrics hook stamps ``sent_at`` on every message; an earlier test in this process may have
    # installed it: these tests compare messages built without it (the hook's own case is covered with headers)
    stamped = signals.before_task_publish.disconnect(stamp_sent_at)
    a = make_celery(load_settings(redis={"url": "redis://127.0.0.1:1/0"}, metrics={"enabled": False}), name="t")
    a.conf.broker_url = "memory://"
    a.conf.broker_transport = "memory"  # not the project's Redis transport: nothing leaves the process
    yield a
    a.close()
    if stamped:
        signals.before_task_publish.connect(stamp_sent_at, weak=False)


def celery_item(app: Any, task_id: str, payload: Any, argsrepr: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """What ``send_task`` would LPUSH for this task (kombu's JSON of the message), and the message."""
    captured: list[dict[str, Any]] = []
    with app.producer_or_acquire() as producer:
        producer.channel._put = lambda q, m, **kw: captured.append(m)
        try:
            app.send_task(
                ENROLL,
                args=[payload],
                task_id=task_id,
                ignore_result=True,
                argsrepr=argsrepr,
                producer=producer,
                retry=False,
                **options,
            )
        finally:
            del producer.channel._put
    (message,) = captured
    return str(kombu_dumps(message)), message


PAYLOADS = [
    {"kind": "enroll", "tenant": "acme", "subject": "ann", "images": ["s3://b/in/a.jpg"], "key_id": "k1"},
    {"tenant": "acme", "images": ["s3://b/in/é ü/😀.jpg", 's3://b/in/"q"\\x.png'], "n": 3, "t": 0.1, "z": None},
    {"nested": {"list": [1, 2.5, True, False, None, "a%sb{0}"]}, "empty": {}, "tab": "a\tb"},
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize(
    "options",
    [
        {"queue": "engine.interactive", "headers": {"sent_at": 1234.5}},
        {"queue": "engine.bulk", "kwargs": {"parent": "bulk-job-0001"}},
    ],
)
def test_a_rendered_item_is_what_celery_pushes(app: Any, payload: dict[str, Any], options: dict[str, Any]) -> None:
    headers = {"sent_at": 0.0} if "headers" in options else None
    tpl = MessageTemplate(
        app,
        ENROLL,
        options["queue"],
        "acme/sample-0001",
        [PAYLOADS[0]],
        short_argsrepr("enroll", "sample-0001"),
        kwargs=options.get("kwargs"),
        headers=headers,
    )
    assert tpl.key == options["queue"]
    task_id, argsrepr = "acme/job-00000042", short_argsrepr("enroll", "job-00000042")
    expected, message = celery_item(app, task_id, payload, argsrepr, **options)
    tag = message["properties"]["delivery_tag"]
    sent_at = message["headers"].get("sent_at")
    assert tpl.render(task_id, [payload], argsrepr, sent_at, tag) == expected
    item = json.loads(tpl.render(task_id, [payload], argsrepr))  # a fresh delivery tag and the current time
    assert uuid.UUID(item["properties"]["delivery_tag"]).version == 4
    assert item["properties"]["delivery_tag"] != tag
    assert ("sent_at" in item["headers"]) == ("headers" in options)


def test_a_wrapped_send_task_refuses_the_template(app: Any) -> None:
    original = app.send_task
    app.send_task = lambda *a, **kw: original(*a, **kw)
    with pytest.raises(TemplateMismatch, match="wrapped"):
        MessageTemplate(app, ENROLL, "engine.interactive", "acme/sample-0001", [{}], "[<x>]")


def test_delivery_tags_are_distinct_uuid4_strings() -> None:
    tags = delivery_tags(1000)
    assert len(set(tags)) == 1000
    for t in tags[:50]:
        u = uuid.UUID(t.decode("ascii"))
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == t.decode("ascii")


def test_packed_commands_are_what_redis_py_packs() -> None:
    from redis.connection import Connection

    args = [b"LPUSH", b"engine.interactive", b"", b"x" * 7000, "é".encode(), b"a\r\nb"]
    assert resp.pack(args) == b"".join(Connection().pack_command(*args))
    assert resp.pack_with(args[:2], iter(args[2:4]), 2, args[4:]) == resp.pack(args)


class FakeConnection:
    """A pooled connection that records what would be written and answers every command with ``reply``."""

    def __init__(self, reply: Any = 1) -> None:
        self.sent: list[bytes] = []
        self.reply = reply
        self.disconnected = False

    def send_packed_command(self, chunks: list[bytes]) -> None:
        self.sent.extend(chunks)

    def read_response(self) -> Any:
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    def disconnect(self) -> None:
        self.disconnected = True


class FakeClient:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.connection_pool = self
        self.released = 0

    def get_connection(self) -> FakeConnection:
        return self.conn

    def release(self, conn: FakeConnection) -> None:
        self.released += 1


def decode(packed: bytes) -> list[list[bytes]]:
    """RESP arrays of bulk strings -> argument lists."""
    out, pos = [], 0
    while pos < len(packed):
        assert packed[pos : pos + 1] == b"*"
        end = packed.index(b"\r\n", pos)
        n, pos = int(packed[pos + 1 : end]), end + 2
        args = []
        for _ in range(n):
            assert packed[pos : pos + 1] == b"$"
            end = packed.index(b"\r\n", pos)
            size, pos = int(packed[pos + 1 : end]), end + 2
            args.append(packed[pos : pos + size])
            assert packed[pos + size : pos + size + 2] == b"\r\n"
            pos += size + 2
        out.append(args)
    return out


def test_an_error_reply_raises_after_every_reply_is_read() -> None:
    from redis.exceptions import ResponseError

    conn = FakeConnection(ResponseError("WRONGTYPE"))
    client = FakeClient(conn)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        resp.execute(client, [resp.pack([b"LPUSH", b"k", b"v"]), resp.pack([b"GET", b"k"])])
    assert not conn.disconnected and client.released == 1  # both replies read: the connection is still in step


def test_batch_sender_pushes_each_queue_in_order_in_one_write(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    conn = FakeConnection()

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Any:
        yield FakeClient(conn)

    monkeypatch.setattr(memory.Channel, "conn_or_acquire", conn_or_acquire, raising=False)
    sender = BatchSender(app, kwargs={"parent": "bulk-job-0001"})
    jobs = [
        (ENROLL, "engine.bulk" if i % 3 else "engine.interactive", f"acme/job-{i:08d}", dict(PAYLOADS[1], n=i), "[<>]")
        for i in range(10)
    ]
    sender.add(jobs[:4])
    assert conn.sent == []  # nothing is sent before flush
    sender.add(jobs[4:])
    sender.flush()
    assert len(conn.sent) == 2  # one LPUSH per queue, one write
    commands = decode(b"".join(conn.sent))
    assert [c[:2] for c in commands] == [[b"LPUSH", b"engine.interactive"], [b"LPUSH", b"engine.bulk"]]
    for (_, key), items in ((c[:2], c[2:]) for c in commands):
        sent = [j for j in jobs if j[1] == key.decode()]
        assert len(items) == len(sent)
        for raw, (_, queue, task_id, payload, argsrepr) in zip(items, sent, strict=True):
            got = json.loads(raw)
            expected, _ = celery_item(app, task_id, payload, argsrepr, queue=queue, kwargs={"parent": "bulk-job-0001"})
            want = json.loads(expected)
            assert got["properties"].pop("delivery_tag") != want["properties"].pop("delivery_tag")
            assert got == want
    sender.add(jobs[:2])
    sender.discard()
    sender.flush()
    assert len(conn.sent) == 2  # nothing more
