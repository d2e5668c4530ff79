"""Redis commands packed by hand and sent as one pipeline on a redis-py client's pooled connection.

For the producer's hot path (``worker.broker.publish.BatchSender``: thousands of ``LPUSH`` items per round trip, and
the submit markers of ``worker.storage.jobbook``): redis-py's pipeline packs every argument through its generic
encoder and parses one reply object per command; here a command is a RESP array of bulk strings built with one
``bytes`` format per argument, and the replies are read with the connection's own parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def pack(args: Sequence[bytes]) -> bytes:
    """One command (``args[0]`` is its name) as a RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


def pack_with(head: Sequence[bytes], items: Iterable[bytes], n: int, tail: Sequence[bytes] = ()) -> bytes:
    """``pack([*head, *items, *tail])`` for ``n`` items without building the argument list (``LPUSH key item...``,
    ``EVAL script n key... arg...``)."""
    out = [b"*%d\r\n" % (len(head) + n + len(tail))]
    out += [b"$%d\r\n%s\r\n" % (len(a), a) for a in head]
    out += [b"$%d\r\n%s\r\n" % (len(a), a) for a in items]
    out += [b"$%d\r\n%s\r\n" % (len(a), a) for a in tail]
    return b"".join(out)


def execute(client: Any, commands: Sequence[bytes]) -> list[Any]:
    """Send packed ``commands`` in one write on one of ``client``'s pooled connections and read their replies (one
    round trip). Every reply is read before an error reply raises (``redis.ResponseError``, the first one), so the
    connection stays usable; a connection error drops the connection and raises (how many commands ran is then
    unknown)."""
    from redis.exceptions import ResponseError

    pool = client.connection_pool
    try:
        conn = pool.get_connection()
    except TypeError:  # pragma: no cover - redis-py 5.0 wants a command name
        conn = pool.get_connection("PIPELINE")
    try:
        conn.send_packed_command(list(commands))
        replies: list[Any] = []
        first: ResponseError | None = None
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as e:
                first = first or e
                replies.append(e)
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    if first is not None:
        raise first
    return replies
