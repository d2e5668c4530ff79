"""JSON on the wire, nothing else. ``from_wire`` accepts the JSON text/bytes or the dict Celery's JSON serializer
decoded; dicts are re-encoded so validation always runs in strict JSON mode (the same rules for both paths)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from worker.contracts.jobs import Job
from worker.contracts.results import Result

_JOB: TypeAdapter[Any] = TypeAdapter(Job)
_JOBS: TypeAdapter[list[Any]] = TypeAdapter(list[Job])
_RESULT: TypeAdapter[Any] = TypeAdapter(Result)
MAX_WIRE_BYTES = 1_000_000


def _text(data: str | bytes | dict[str, Any]) -> str | bytes:
    if isinstance(data, dict):
        return json.dumps(data)
    if isinstance(data, str | bytes | bytearray):
        if len(data) > MAX_WIRE_BYTES:
            raise ValueError(f"message larger than {MAX_WIRE_BYTES} bytes")
        return bytes(data) if isinstance(data, bytearray) else data
    raise TypeError(f"wire data must be JSON text, bytes or a dict, not {type(data).__name__}")


def to_wire(model: Any) -> dict[str, Any]:
    """A job or result as a JSON-compatible dict (what Celery's JSON serializer sends)."""
    out: dict[str, Any] = model.model_dump(mode="json")
    return out


def to_json(model: Any) -> str:
    out: str = model.model_dump_json()
    return out


def job_from_wire(data: str | bytes | dict[str, Any]) -> Any:
    """Parse and validate a job message. Raises ``worker.errors.MalformedJobError`` (no input values echoed)."""
    from worker.errors import MalformedJobError

    try:
        return _JOB.validate_json(_text(data))
    except (ValidationError, ValueError, TypeError) as e:
        raise MalformedJobError(_describe(e)) from None


def jobs_from_wire(items: Sequence[dict[str, Any]]) -> list[Any]:
    """``job_from_wire`` for many job dicts: one JSON encode and one validator call for the lot (the same strict JSON
    rules). When any item is bad, every item is parsed on its own, in order, so the first bad one raises exactly the
    ``MalformedJobError`` that ``job_from_wire`` gives it."""
    try:
        return list(_JOBS.validate_json(json.dumps(list(items))))
    except (ValidationError, ValueError, TypeError, RecursionError):
        return [job_from_wire(d) for d in items]


def to_wire_many(models: Sequence[Any]) -> list[dict[str, Any]]:
    """``to_wire`` of many jobs (validated job models), in one serializer call."""
    return list(_JOBS.dump_python(list(models), mode="json"))


def result_from_wire(data: str | bytes | dict[str, Any]) -> Any:
    from worker.errors import MalformedJobError

    try:
        return _RESULT.validate_json(_text(data))
    except (ValidationError, ValueError, TypeError) as e:
        raise MalformedJobError(_describe(e)) from None


def _describe(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = [f"{'.'.join(map(str, er['loc'])) or '<root>'}: {er['msg']}" for er in e.errors(include_input=False)]
        return "malformed message: " + "; ".join(parts[:10])
    return f"malformed message: {e}"
