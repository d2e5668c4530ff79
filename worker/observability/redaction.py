"""Redaction: the one scrubber that keeps secrets out of every Sentry event and log line, and the logging filter
that applies it (``RedactionFilter``, also put on botocore's loggers by ``worker.keys.providers``).

The ``Scrubber`` removes, wherever they appear (exception messages, frame locals, extra, contexts, breadcrumbs, log
messages):

- values under sensitive names (key, seed, secret, embedding, latent, image, template, password, token, ...);
- every secret from settings (``SecretStr`` fields, passwords in URLs) and secrets registered at run time;
- S3 presigned URL query strings (``X-Amz-Signature`` / ``X-Amz-Credential`` / ``Signature=``);
- ``bytes`` reprs (image bytes, raw keys), long hex (>= 40 chars) and high-entropy base64 tokens (keys, seeds, MACs);
- numeric arrays (embeddings, latents, pixels) as lists or as ``tensor([...])`` / ``array([...])`` text.

It keeps what an operator needs: the job ID and job type (tags from ``job_scope``) and the error code (tag added
from the exception), exception types, file names and line numbers.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import re
import threading
from collections.abc import Iterable
from typing import Any

from worker.observability.context import current_job

FILTERED = "[Filtered]"

_DENY_TOKENS = frozenset(
    {
        "key",
        "keys",
        "material",
        "seed",
        "seeds",
        "secret",
        "secrets",
        "password",
        "passwd",
        "token",
        "credential",
        "credentials",
        "authorization",
        "auth",
        "cookie",
        "signature",
        "private",
        "dsn",
        "mac",
        "hmac",
        "embedding",
        "embeddings",
        "emb",
        "latent",
        "latents",
        "vector",
        "template",
        "image",
        "images",
        "img",
        "imgs",
        "face",
        "faces",
        "pixels",
        "rgb",
        "blob",
        "raw",
        "buf",
        "buffer",
        "z",
        "w",
        "ws",
    }
)
# A sensitive word followed by one of these names an identifier or a count, not the secret itself.
_ALLOW_LAST = frozenset(
    {"id", "ids", "version", "versions", "code", "count", "counts", "len", "shape", "dtype", "ref", "refs", "kind"}
    | {"type", "name", "names", "path", "uri", "hash", "sha256", "prefix", "bucket", "provider", "size", "format"}
)
# Structural fields Sentry itself fills: never rewritten (event_id and trace_id are 32 hex chars).
_KEEP_KEYS = frozenset(
    {"event_id", "trace_id", "span_id", "parent_span_id", "timestamp", "start_timestamp", "platform", "level"}
    | {"sdk", "modules", "debug_meta", "release", "environment", "server_name", "dist", "abs_path", "filename"}
    | {"module", "function", "lineno", "colno", "in_app", "pre_context", "context_line", "post_context"}
    | {"instruction_addr", "mechanism", "_meta", "type", "logger", "category", "thread_id"}
)

_PRESIGNED = re.compile(r"(https?://[^\s?#'\"]+)\?[^\s#'\"]*(?:X-Amz-|Signature=|AWSAccessKeyId=)[^\s#'\"]*", re.I)
_AMZ_PARAM = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)|Signature|AWSAccessKeyId)=[^&\s'\"]+", re.I)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*):([^@\s/]+)@", re.I)
_BYTES_REPR = re.compile(r"(?:bytearray\()?b(['\"])(?:\\.|(?!\1).){8,}?\1\)?")
_HEX = re.compile(r"\b[0-9a-fA-F]{40,}\b")
_B64 = re.compile(r"[A-Za-z0-9+/_-]{40,}={0,2}")
_NUM_LIST = re.compile(r"[\[(](?:\s*-?\d+(?:\.\d*)?(?:e[-+]?\d+)?\s*,){5,}[^\])]*[\])]?", re.I)
_NUMBER = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?|-?\d+(?:e[-+]?\d+)?", re.I)
# runs of numbers as arrays print them (commas, spaces or brackets between): >= 6 floats or >= 16 integers
_FLOAT_RUN = re.compile(r"-?\d+\.\d*(?:e[-+]?\d+)?(?:[\s,\[\]()]+-?\d+\.\d*(?:e[-+]?\d+)?){5,}", re.I)
_INT_RUN = re.compile(r"(?<![\w.-])-?\d+(?:[\s,\[\]()]+-?\d+){15,}(?![\w.])")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _entropy(s: str) -> float:
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def sensitive_name(name: str) -> bool:
    """True when a variable / field name says its value is secret (``seed``, ``image_bytes``, ``s3SecretKey``)."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", str(name)).lower()) if t]
    if not tokens or tokens[-1] in _ALLOW_LAST:
        return False
    return any(t in _DENY_TOKENS for t in tokens)


class Scrubber:
    """Removes secrets from strings, nested event data and log records. Thread-safe; secrets can be added."""

    def __init__(self, secrets: Iterable[str | bytes] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: list[str] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str | bytes | None]) -> None:
        """Register literal secrets; ``bytes`` are also matched as hex and base64 text."""
        forms: set[str] = set()
        for s in secrets:
            if s is None:
                continue
            if isinstance(s, bytes | bytearray):
                raw = bytes(s)
                forms.update({raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()})
                forms.update(f.rstrip("=") for f in list(forms))
                with contextlib.suppress(UnicodeDecodeError):
                    forms.add(raw.decode())
            else:
                forms.add(str(s))
        with self._lock:
            self._secrets = sorted({*self._secrets, *(f for f in forms if len(f) >= 6)}, key=len, reverse=True)

    # --- strings ------------------------------------------------------------------------------------------------
    def scrub_text(self, text: str) -> str:
        """One string with every secret pattern replaced by ``[Filtered]``."""
        if not text:
            return text
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, FILTERED)
        text = _PRESIGNED.sub(lambda m: m.group(1) + "?" + FILTERED, text)
        text = _AMZ_PARAM.sub(lambda m: m.group(1) + "=" + FILTERED, text)
        text = _URL_PASSWORD.sub(lambda m: m.group(1) + ":" + FILTERED + "@", text)
        text = _BYTES_REPR.sub(FILTERED, text)
        text = _HEX.sub(FILTERED, text)
        text = _B64.sub(lambda m: FILTERED if _looks_random(m.group(0)) else m.group(0), text)
        text = _NUM_LIST.sub(FILTERED, text)
        # an embedding, latent or pixel array printed as text: only the numbers go, the rest of the line (job ID,
        # exception type, file and line) stays readable
        text = _FLOAT_RUN.sub(FILTERED, text)
        return _INT_RUN.sub(FILTERED, text)

    # --- nested data --------------------------------------------------------------------------------------------
    def scrub(self, value: Any, name: str | None = None) -> Any:
        """Scrub a JSON-like structure (what Sentry serialises) recursively; returns a new structure."""
        if name is not None and name in _KEEP_KEYS:
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v, str(k)) for k, v in value.items()}
        if name is not None and sensitive_name(name) and value not in (None, "", [], ()):
            return FILTERED
        if isinstance(value, bytes | bytearray | memoryview):
            return FILTERED
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, list | tuple):
            if len(value) >= 6 and all(_numeric(v) for v in value):
                return FILTERED
            return [self.scrub(v) for v in value]
        if isinstance(value, bool | int | float) or value is None:
            return value
        if type(value).__module__.split(".")[0] in ("numpy", "torch"):
            return FILTERED
        return self.scrub_text(repr(value))

    def scrub_event(self, event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sentry ``before_send``: scrub everything and tag the error code of the exception being reported."""
        event = self.scrub(event)
        exc_info = (hint or {}).get("exc_info")
        if exc_info and exc_info[1] is not None:
            tags = event.setdefault("tags", {})
            if isinstance(tags, dict):
                tags["error_code"] = _error_code(exc_info[1])
        return event

    def scrub_breadcrumb(self, crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sentry ``before_breadcrumb``."""
        return self.scrub(crumb)


def _numeric(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    return isinstance(v, str) and _NUMBER.fullmatch(v.strip()) is not None


def _looks_random(token: str) -> bool:
    core = token.rstrip("=")
    classes = sum(bool(re.search(p, core)) for p in ("[a-z]", "[A-Z]", "[0-9]"))
    return classes >= 3 and _entropy(core) >= 4.2


def _error_code(exc: BaseException) -> str:
    from worker import errors

    code = getattr(exc, "code", None) if isinstance(exc, errors.CancelableError) else None
    return code if isinstance(code, str) else errors.CancelableError.code


# --- settings -----------------------------------------------------------------------------------------------------
def settings_secrets(settings: Any) -> list[str]:
    """Every secret value in a pydantic settings tree: ``SecretStr``/``SecretBytes`` fields, string fields under a
    sensitive name, and passwords inside URLs."""
    from pydantic import BaseModel, SecretBytes, SecretStr

    out: list[str] = []

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, BaseModel):
            for field in type(obj).model_fields:
                walk(getattr(obj, field, None), field)
        elif isinstance(obj, SecretStr | SecretBytes):
            v = obj.get_secret_value()
            v = v.decode(errors="replace") if isinstance(v, bytes) else v
            m = _URL_PASSWORD.search(v)
            if m:
                out.append(m.group(2))
            if m or not re.match(r"[a-z][a-z0-9+.-]*://", v, re.I):  # a URL without a password is not secret
                out.append(v)
        elif isinstance(obj, str):
            m = _URL_PASSWORD.search(obj)
            if m:
                out.append(m.group(2))
            if sensitive_name(name):
                out.append(obj)

    walk(settings, "")
    return [s for s in out if s]


SCRUBBER = Scrubber()


# --- logging filter -----------------------------------------------------------------------------------------------
class RedactionFilter(logging.Filter):
    """Formats each record's message (and traceback) once and scrubs it, so no handler can print a secret."""

    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or SCRUBBER

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        for marker in _BODY_DUMPS:  # Celery's unknown/invalid-message reports print the whole job: not its body
            if marker in message:
                message = message.split(marker, 1)[0].rstrip() + " [message body not logged]"
        if any(m in message for m in _SECRET_OUTPUTS):  # botocore's DEBUG dump of a GenerateMac body IS the seed
            message = "Response body: <redacted: KMS secret output>"
        if record.name == "celery.app.trace" and " succeeded in " in message:
            message = message.split(": ", 1)[0]  # "Task ...[id] succeeded in 1.2s": the return value is the result
        job = current_job()
        job_id, job_type, tenant = job if job is not None else ("-", "-", "-")
        record.job_id, record.job_type = job_id, job_type
        record.tenant = tenant if tenant != "-" else str(getattr(record, "tenant", "-"))  # or the line's extra=
        record.msg = self.scrubber.scrub_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrubber.scrub_text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrubber.scrub_text(record.stack_info)
        return True


_BODY_DUMPS = ("The full contents of the message", "The message body was", "The full contents of the body")
_SECRET_OUTPUTS = ('"Mac"', '"Plaintext"')  # KMS response fields that carry secret output
