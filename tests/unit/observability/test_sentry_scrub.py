"""Sentry events and log lines never carry key material, seeds, embeddings, image bytes, presigned URLs or
settings secrets, while the job ID and the error code still reach the event (in-process transport, no network)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os

import numpy as np
import pytest
import sentry_sdk
from sentry_sdk.transport import Transport

from worker import observability
from worker.errors import NoFaceError, StorageError
from worker.observability import FILTERED, Scrubber, init_sentry, job_scope, sensitive_name, setup_logging
from worker.settings import load_settings

JOB_ID = "job-7f3c2a10-enroll-0001"
SEED = bytes(range(7, 39))  # 32 bytes, what keys.derive returns
KEY_MATERIAL = os.urandom(32)
S3_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzz9EXAMPLEKEY"
REDIS_PASSWORD = "hunter2-redis-pass"
PRESIGNED = (
    "https://s3.example.com/cancelable/t1/s1/img.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
    "&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
)
EMBEDDING = [round(0.0137 * i - 0.41, 6) for i in range(64)]
IMAGE_BYTES = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(200, 256)) * 4


class CapturingTransport(Transport):
    """Keeps envelopes in memory instead of sending them."""

    def __init__(self, options=None):
        super().__init__(options)
        self.envelopes = []

    def capture_envelope(self, envelope):
        self.envelopes.append(envelope)

    def flush(self, timeout, callback=None):
        return None

    def kill(self):
        return None

    def events(self) -> list[dict]:
        out = []
        for env in self.envelopes:
            for item in env.items:
                if item.type == "event":
                    out.append(item.payload.json)
        return out


def forbidden_forms() -> dict[str, str]:
    forms = {
        "seed hex": SEED.hex(),
        "seed b64": base64.b64encode(SEED).decode().rstrip("="),
        "seed repr": repr(SEED)[2:30],
        "key hex": KEY_MATERIAL.hex(),
        "key b64": base64.b64encode(KEY_MATERIAL).decode().rstrip("="),
        "key repr": repr(KEY_MATERIAL)[2:30],
        "amz signature": "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        "amz credential": "AKIAEXAMPLE",
        "s3 secret": S3_SECRET,
        "redis password": REDIS_PASSWORD,
        "image repr": repr(IMAGE_BYTES)[2:40],
        "jfif": "JFIF",
    }
    for i in (3, 17, 40):
        forms[f"embedding[{i}]"] = str(EMBEDDING[i])
    return forms


def all_strings(obj) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in all_strings(k) + all_strings(v)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in all_strings(v)]
    return [obj] if isinstance(obj, str) else [str(obj)]


def assert_clean(text_or_obj) -> None:
    strings = all_strings(text_or_obj) if not isinstance(text_or_obj, str) else [text_or_obj]
    blob = "\n".join(strings)
    leaks = {name: form for name, form in forbidden_forms().items() if form in blob}
    assert not leaks, f"secrets reached the output: {sorted(leaks)}"


@pytest.fixture()
def settings(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CANCELABLE_"):
            monkeypatch.delenv(k)
    return load_settings(
        s3={"access_key_id": "AKIAEXAMPLEID01", "secret_access_key": S3_SECRET},
        redis={"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"},
        sentry={"dsn": "https://publickey@o0.ingest.example.invalid/1", "environment": "ci", "release": "cf@9.9.9"},
    )


@pytest.fixture()
def transport(settings):
    t = CapturingTransport()
    assert init_sentry(settings, transport=t)
    yield t
    sentry_sdk.get_client().close()
    sentry_sdk.init()


def _enroll_that_fails(job_id: str) -> None:
    seed = SEED  # noqa: F841 - locals are what Sentry would capture
    key_material = KEY_MATERIAL  # noqa: F841
    embedding = np.asarray(EMBEDDING, dtype=np.float32)  # noqa: F841
    embeddings_list = list(EMBEDDING)  # noqa: F841
    raw_body = IMAGE_BYTES  # noqa: F841
    url = PRESIGNED  # noqa: F841
    config = {"s3_secret": S3_SECRET, "note": f"seed was {SEED.hex()}"}  # noqa: F841
    logging.getLogger("worker.tasks").warning("download %s with seed %s", PRESIGNED, SEED.hex())
    raise NoFaceError(f"no face in image for job {job_id}; url={PRESIGNED}")


def test_exception_event_is_scrubbed_but_keeps_job_id_and_code(transport):
    sentry_sdk.add_breadcrumb(category="s3", message=f"GET {PRESIGNED}", data={"seed": SEED, "bytes": IMAGE_BYTES})
    with job_scope(JOB_ID, "enroll"):
        sentry_sdk.set_extra("embedding", EMBEDDING)
        sentry_sdk.set_extra("template", {"embedding": EMBEDDING, "key_id": "tenant-key-1"})
        sentry_sdk.set_extra("image_bytes", IMAGE_BYTES)
        sentry_sdk.set_extra("key_hex", KEY_MATERIAL.hex())
        sentry_sdk.set_context("keys", {"material_b64": base64.b64encode(KEY_MATERIAL).decode()})
        try:
            _enroll_that_fails(JOB_ID)
        except NoFaceError:
            sentry_sdk.capture_exception()
    events = transport.events()
    assert len(events) == 1
    event = events[0]
    assert_clean(event)
    assert event["tags"]["job_id"] == JOB_ID
    assert event["tags"]["job_type"] == "enroll"
    assert event["tags"]["error_code"] == "no_face"
    assert event["environment"] == "ci" and event["release"] == "cf@9.9.9"
    # the scrubber really ran over the places that held secrets (not just dropped them)
    exc = event["exception"]["values"][-1]
    assert exc["type"] == "NoFaceError" and JOB_ID in exc["value"]
    frame_vars = exc["stacktrace"]["frames"][-1]["vars"]
    assert frame_vars["seed"] == FILTERED and frame_vars["key_material"] == FILTERED
    assert frame_vars["embedding"] == FILTERED and frame_vars["raw_body"] == FILTERED
    assert "X-Amz-Signature" not in json.dumps(event) or FILTERED in frame_vars["url"]
    assert JOB_ID in frame_vars["job_id"]  # Sentry stores locals as reprs
    crumbs = event["breadcrumbs"]["values"]
    assert any(c.get("category") == "s3" for c in crumbs)
    assert any(c.get("category") == "worker.tasks" for c in crumbs)  # the log line became a scrubbed breadcrumb
    assert event["extra"]["template"]["key_id"] == "tenant-key-1"


def test_message_and_logged_error_are_scrubbed(transport):
    with job_scope(JOB_ID, "verify"):
        sentry_sdk.capture_message(f"probe {PRESIGNED} seed={SEED.hex()} emb={EMBEDDING[:12]}")
        try:
            raise StorageError(f"upload failed, secret {S3_SECRET} key {base64.b64encode(KEY_MATERIAL).decode()}")
        except StorageError:
            logging.getLogger("worker.storage").exception("upload failed for %s", PRESIGNED)
    events = transport.events()
    assert len(events) == 2
    for event in events:
        assert_clean(event)
        assert event["tags"]["job_id"] == JOB_ID
    assert events[1]["tags"]["error_code"] == "storage_error"


def test_logging_redaction_filter(settings):
    stream = io.StringIO()
    handler = setup_logging(settings, level="INFO", stream=stream)
    try:
        log = logging.getLogger("worker.test")
        log.info("seed=%s key=%r url=%s", SEED.hex(), KEY_MATERIAL, PRESIGNED)
        log.info("s3 secret %s on redis://:%s@host:6379/0, emb %s", S3_SECRET, REDIS_PASSWORD, EMBEDDING)
        try:
            raise ValueError(f"bad bytes {IMAGE_BYTES!r}")
        except ValueError:
            log.exception("job %s failed", JOB_ID)
    finally:
        logging.getLogger().removeHandler(handler)
    out = stream.getvalue()
    assert_clean(out)
    assert JOB_ID in out and "ValueError" in out and out.count(FILTERED) >= 6


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("seed", True),
        ("key_material", True),
        ("s3SecretKey", True),
        ("image_bytes", True),
        ("embeddings", True),
        ("w", True),
        ("key_id", False),
        ("job_id", False),
        ("image_refs", False),
        ("template_version", False),
        ("error_code", False),
        ("tenant", False),
    ],
)
def test_sensitive_names(name, secret):
    assert sensitive_name(name) is secret


def test_scrub_text_patterns_and_what_survives():
    s = Scrubber(["registered-secret-123", KEY_MATERIAL])
    assert s.scrub_text("token registered-secret-123 used") == f"token {FILTERED} used"
    assert KEY_MATERIAL.hex()[:20] not in s.scrub_text(f"k={KEY_MATERIAL.hex()[:40]}")
    assert s.scrub_text(PRESIGNED).endswith("?" + FILTERED)
    assert s.scrub_text(f"tensor({EMBEDDING[:8]})") == f"tensor({FILTERED})"
    assert str(EMBEDDING[20]) not in s.scrub_text(f"array({[EMBEDDING[i : i + 3] for i in range(0, 30, 3)]})")
    assert FILTERED in s.scrub_text(f"seed {SEED.hex()}")
    assert FILTERED in s.scrub_text(f"key {base64.b64encode(KEY_MATERIAL).decode()}")
    assert FILTERED in s.scrub_text(f"img {IMAGE_BYTES!r}")
    keep = "job 3f2a6b1c-9d4e-4f00-8a1b-2c3d4e5f6a7b subject s-0001 shape (3, 256, 256) code no_face"
    assert s.scrub_text(keep) == keep
    path = "s3://cancelable/tenants/acme/subjects/s-0001/versions/00000003/template.json"
    assert s.scrub_text(path) == path


def test_init_without_dsn_is_a_noop(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CANCELABLE_"):
            monkeypatch.delenv(k)
    assert init_sentry(load_settings()) is False
    assert observability.settings_secrets(load_settings()) == []


def test_redaction_survives_celery_taking_over_the_root_logger(settings, tmp_path):
    """Celery's worker clears the root handlers after ``worker_init`` and installs its own: the filter must follow."""
    from celery import Celery
    from celery.app import log as celery_log

    setup_logging(settings, level="INFO", stream=io.StringIO())
    logfile = tmp_path / "worker.log"
    app = Celery("t")
    app.conf.worker_hijack_root_logger = True
    root = logging.getLogger()
    saved = list(root.handlers)
    celery_log.Logging._setup = False
    try:
        app.log.setup_logging_subsystem(loglevel="INFO", logfile=str(logfile))
        assert not any(getattr(h, "_cancelable", False) for h in root.handlers)  # ours was removed...
        logging.getLogger("worker.tasks").warning("seed %s via %s", SEED.hex(), PRESIGNED)
        for h in root.handlers:
            h.flush()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
        celery_log.Logging._setup = False
    out = logfile.read_text()
    assert (
        "seed [Filtered] via https://s3.example.com/cancelable/t1/s1/img.jpg?[Filtered]" in out
    )  # ...the filter stayed
    assert_clean(out)


def test_log_lines_carry_the_job_and_extra_fields_scrubbed(settings):
    stream = io.StringIO()
    handler = setup_logging(settings, level="INFO", stream=stream)
    try:
        log = logging.getLogger("worker.test")
        with job_scope(JOB_ID, "enroll"):
            log.info("committed version", extra={"tenant": "acme", "version": 3, "seed": SEED.hex()})
            log.warning("Received unregistered task.\nThe full contents of the message body was:\n{'tenant': 'acme'}")
        log.info("outside any job")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert f"[job {JOB_ID} enroll tenant acme]: committed version (seed={FILTERED}, version=3)" in lines[0]
    assert "message body not logged" in lines[1] and "'tenant'" not in stream.getvalue()
    assert "[job - - tenant -]: outside any job" in lines[-1]
    assert SEED.hex() not in stream.getvalue()


def test_json_log_lines_carry_job_type_and_tenant_of_the_scope(settings, monkeypatch):
    monkeypatch.setenv("CANCELABLE_LOG_FORMAT", "json")
    stream = io.StringIO()
    handler = setup_logging(settings, level="INFO", stream=stream)
    try:
        with job_scope(JOB_ID, "verify", tenant="acme"):
            logging.getLogger("worker.test").info("scored", extra={"seed": SEED.hex()})
    finally:
        logging.getLogger().removeHandler(handler)
    line = json.loads(stream.getvalue().splitlines()[0])
    assert (line["job_id"], line["job_type"], line["tenant"], line["message"]) == (JOB_ID, "verify", "acme", "scored")
    assert line["seed"] == FILTERED and SEED.hex() not in stream.getvalue()
