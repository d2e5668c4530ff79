"""The Redis broker transport, hardened against poison messages.

kombu's Redis transport decodes every list item it pops as a JSON envelope and hands it to the consumer. Anything
else stops the worker: a non-JSON item raises ``JSONDecodeError`` out of the event loop (the message is lost), and a
JSON value that is not an envelope (a string, a list, a dict without ``properties``) fails in ``Message.__init__``,
is put back on shutdown and kills every restart. Anyone who can push to the Redis list can do either.

``Transport`` (selected with Celery's ``broker_transport``) keeps kombu's behaviour for well-formed envelopes and
turns everything else into a dead letter: never delivered, never re-queued, recorded in Redis by the SHA-256 and
size of the raw bytes (never the bytes themselves: they may hold anything) and logged at WARNING. The worker goes on
with the next message. An envelope with a ``compression`` header is refused here too, before kombu would
decompress it (``kombu.Message.__init__``, without any size limit: 2 KB of bz2 grow a worker by gigabytes); this
system's producers never compress.

Envelopes that kombu accepts but Celery cannot use are refused after it: by ``guarded_strategy`` (the strategy of
every task of this app) a body that is not ``[args, kwargs, embed]`` (it would raise in the consumer, ``too many
values to unpack``, and stop it) or whose content type is not JSON (pickle, yaml: never deserialised); by
``on_unknown_task`` (Celery's ``task_unknown`` signal) a task name this app does not have. Those are rejected (not
re-queued) and recorded the same way.

Every refused message whose job can be read (the task ID is a job reference ``tenant/job_id``, as producers send,
or, for a JSON body, its job argument names a valid tenant and job ID) is dead-lettered under that job reference and
gets a stored ``malformed_job`` result unless the job already has one, so a producer waiting on it is answered; the
others are dead-lettered under ``poison-<sha256>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from kombu.exceptions import ContentDisallowed
from kombu.transport import redis as kredis
from kombu.utils.json import loads as _kombu_loads

log = logging.getLogger(__name__)

POISON_KEY = "poison"  # dead letter IDs: "poison-<first 32 hex of the raw bytes' sha256>"


class _Undecodable(dict):  # type: ignore[type-arg]
    """What ``_loads`` returns for bytes that are not JSON: carries only the hash and size of the raw item."""


_last_raw = threading.local()  # the text ``_loads`` last decoded, so a refused item is hashed as it arrived


def _raw_bytes(s: Any) -> bytes:
    return s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s or b"")


def _loads(s: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        value = _kombu_loads(s, *args, **kwargs)
    except (ValueError, TypeError) as e:
        raw = _raw_bytes(s)
        sha = hashlib.sha256(raw).hexdigest()
        return _Undecodable(sha256=sha, size=len(raw), reason=f"not JSON ({type(e).__name__})")
    _last_raw.item = (id(value), s)
    return value


# kombu's redis module decodes with a module-level ``loads``; route it through ours so that a non-JSON item becomes a
# value ``_deliver`` can refuse instead of an exception in the consumer's event loop. Only decode failures change.
kredis.loads = _loads


def envelope_problem(message: Any) -> str | None:
    """Why ``message`` (a decoded list item) is not a kombu envelope this transport can deliver; None when it is."""
    if isinstance(message, _Undecodable):
        return str(message["reason"])
    if not isinstance(message, dict):
        return f"envelope is a JSON {type(message).__name__}, not an object"
    props = message.get("properties")
    if not isinstance(props, dict):
        return "envelope has no properties object"
    if not isinstance(props.get("delivery_tag"), str) or not props["delivery_tag"]:
        return "envelope has no delivery tag"
    if not isinstance(props.get("delivery_info"), dict):
        return "envelope has no delivery info"
    body = message.get("body")
    if body is not None and not isinstance(body, str):
        return "envelope body is not a string"
    if props.get("body_encoding") == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "envelope body is not valid base64"
    for field in ("headers",):
        if message.get(field) is not None and not isinstance(message[field], dict):
            return f"envelope {field} is not an object"
    for field in ("content-type", "content-encoding"):
        if message.get(field) is not None and not isinstance(message[field], str):
            return f"envelope {field} is not a string"
    if (message.get("headers") or {}).get("compression") is not None:
        return "compressed body refused (producers never compress; it is not decompressed)"
    return None


def _task_id(message: Any) -> Any:
    """The task ID of a decoded list item, if it has one (protocol 2: ``headers.id``)."""
    if isinstance(message, dict) and isinstance(message.get("headers"), dict):
        return message["headers"].get("id")
    return None


def _fingerprint(message: Any) -> tuple[str, int]:
    """SHA-256 and size of the item as the transport received it (kombu decodes it as UTF-8, invalid bytes
    replaced); canonical JSON if the raw text is no longer at hand."""
    if isinstance(message, _Undecodable):
        return str(message["sha256"]), int(message["size"])
    last = getattr(_last_raw, "item", None)
    raw = _raw_bytes(last[1]) if last is not None and last[0] == id(message) else None
    if raw is None:
        raw = json.dumps(message, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest(), len(raw)


class Transport(kredis.Transport):  # type: ignore[misc]
    """kombu's Redis transport, refusing (and recording) anything that is not a well-formed envelope."""

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem is None:
            super()._deliver(message, queue)
            return
        sha, size = _fingerprint(message)
        log.warning("poison message dead-lettered: queue %s, %d bytes, sha256 %s: %s", queue, size, sha[:16], problem)
        record_refused(_task_id(message), queue, sha, size, f"poison message on queue {queue}: {problem}")


def record_refused(task_id: Any, queue: str, sha: str, size: int, message: str, job: Any = None) -> None:
    """Dead-letter a refused message (by the SHA-256 and size of its bytes, never the bytes) and, when its job can be
    read (``task_id`` a job reference, or ``job`` a job argument naming a valid tenant and job ID), store a
    ``malformed_job`` result for that job unless it has one, and key the dead letter by the job reference (an
    existing dead letter of the job is kept); otherwise the dead letter is ``poison-<sha256 prefix>``."""
    from worker.tasks.envelope import readable_ref, store_refused

    ident = readable_ref(job, task_id)
    dead_id = f"{ident[0]}/{ident[1]}" if ident else f"{POISON_KEY}-{sha[:32]}"
    record: dict[str, Any] = {
        "job_id": ident[1] if ident else dead_id,
        "job_kind": "unknown",
        "error_code": "malformed_job",
        "message": message[:500],
        "raw_sha256": sha,
        "raw_size": size,
        "queue": queue,
        "attempts": 0,
        "at": datetime.now(UTC).isoformat(),
    }
    if ident:
        record["tenant"] = ident[0]  # Redis only: the reconciler never copies it over a job's S3 dead letter
    try:
        from worker.tasks.runtime import get_runtime

        book = get_runtime().book
        if ident is None or book.get_dead_letter(dead_id) is None:
            book.add_dead_letter(dead_id, {**record, "s3_uri": None})
        if ident is not None:
            result = {
                "schema_version": 1,
                "job_id": ident[1],
                "tenant": ident[0],
                "status": "failed",
                "error": {"code": "malformed_job", "message": record["message"], "retryable": False},
                "attempts": 0,
            }
            store_refused(book, ident, result)
    except Exception as e:  # recording must never take the consumer down
        log.error("could not record refused message %s: %s", dead_id, type(e).__name__)


def _job_argument(message: Any) -> Any:
    """The job argument of a JSON task message (``[[job], kwargs, embed]``), else None. Only a body the app accepts
    is decoded (JSON; a pickle or yaml body raises ``ContentDisallowed`` before any deserialiser runs)."""
    try:
        payload = message.payload
    except Exception:  # undecodable: no job to read
        return None
    if isinstance(payload, list | tuple) and payload and isinstance(payload[0], list | tuple) and len(payload[0]) == 1:
        return payload[0][0]
    return None


def refuse_message(message: Any, problem: str) -> None:
    """Record a task message the worker will not run (``record_refused``); the caller rejects it."""
    raw = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    queue = (message.delivery_info or {}).get("routing_key") or "unknown"
    sha = hashlib.sha256(raw).hexdigest()
    log.warning("malformed task message refused: queue %s, %d bytes, sha256 %s: %s", queue, len(raw), sha[:16], problem)
    task_id = message.headers.get("id") if isinstance(message.headers, dict) else None
    record_refused(task_id, queue, sha, len(raw), f"malformed task message on queue {queue}: {problem}")


def on_unknown_task(message: Any = None, name: Any = None, **_: Any) -> None:
    """Celery's ``task_unknown`` signal (the message is already rejected): record it, keyed by its job if readable."""
    if message is None:
        return
    raw = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    queue = (message.delivery_info or {}).get("routing_key") or "unknown"
    sha = hashlib.sha256(raw).hexdigest()
    what = f"unknown task name ({len(str(name))} chars)"  # the name is the sender's text: not echoed
    log.warning("unknown task refused: queue %s, %d bytes, sha256 %s", queue, len(raw), sha[:16])
    task_id = message.headers.get("id") if isinstance(message.headers, dict) else None
    record_refused(task_id, queue, sha, len(raw), f"task message on queue {queue}: {what}", job=_job_argument(message))


def body_problem(message: Any) -> str | None:
    """Why a protocol-2 task message cannot be run; None when its body is ``[args, kwargs, embed]``."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    if not isinstance(headers.get("id"), str):
        return "task message has no task id"
    try:
        payload = message.payload  # a content type the app does not accept raises before any deserialiser runs
    except ContentDisallowed:
        return "content type refused (JSON only; never deserialised)"
    except Exception as e:  # DecodeError and whatever a broken body raises
        return f"task body does not decode ({type(e).__name__})"
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        return "task body is not [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict) or not isinstance(embed, dict | None):
        return "task body is not [args, kwargs, embed]"
    return None


def guarded_strategy(task: Any, app: Any, consumer: Any, **kw: Any) -> Any:
    """Celery's default strategy behind a shape check of the message (see the module docstring)."""
    from celery.worker.strategy import default

    inner = default(task, app, consumer, **kw)

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        problem = body_problem(message) if body is None else None
        if problem is None:
            return inner(message, body, ack, reject, callbacks, **kwargs)
        refuse_message(message, problem)
        message.reject_log_error(log, consumer.connection_errors, requeue=False)
        return None

    return handler
