"""Every bad-input class against a real worker: its own error code in a ``failed`` result, nothing written for the
subject, and the same worker process still serving afterwards."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from worker_harness import Deployment, job_id, running

from worker.broker.config import ENGINE_QUEUE, TASK_ENROLL, TASK_VERIFY
from worker.contracts import JobStatus

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height: tens of kB on the wire, width*height pixels decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bad_inputs(dep: Deployment) -> dict[str, tuple[bytes, str]]:
    good = dep.s3.get_object(Bucket=dep.input_bucket, Key="tenants/acme/obama.jpg")["Body"].read()
    corrupt = bytearray(good)
    corrupt[300:] = bytes((i * 7919) % 251 for i in range(len(corrupt) - 300))
    gradient = Image.linear_gradient("L").resize((320, 320)).convert("RGB")
    a = Image.open(io.BytesIO(good)).convert("RGB")
    b = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # two faces of the same size side by side
    pair = Image.new("RGB", (a.width * 2, a.height))
    pair.paste(a, (0, 0))
    pair.paste(b, (a.width, 0))
    gif = io.BytesIO()
    a.save(gif, format="GIF")
    return {
        "corrupt-jpeg": (bytes(corrupt), "invalid_image"),
        "truncated": (good[: len(good) // 3], "invalid_image"),
        "zero-bytes": (b"", "invalid_image"),
        "not-an-image": (b"%PDF-1.4\n" + b"this is not a picture\n" * 50, "invalid_image"),
        "bomb-20000": (png_bomb(20000, 20000), "image_too_large"),
        "gif": (gif.getvalue(), "unsupported_format"),
        "no-face": (_jpeg(gradient), "no_face"),
        "two-faces": (_jpeg(pair), "multiple_faces"),
    }


def _nothing_written(dep: Deployment, subject: str) -> None:
    r = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix=f"tenants/acme/subjects/{subject}/")
    assert r.get("KeyCount", 0) == 0, [o["Key"] for o in r.get("Contents", [])]


def test_bad_inputs_each_get_their_code_and_the_worker_keeps_serving(dep: Deployment) -> None:
    c = dep.client
    pids = (dep.worker.popen.pid, sorted(dep.worker.children()))

    submitted = {}
    for name, (body, code) in _bad_inputs(dep).items():
        ref = dep.upload_input("acme", f"bad/{name}.img", body)
        submitted[name] = (c.submit(c.enroll_job("acme", f"bad-{name}", [ref], "k1")), code)
    submitted["missing-object"] = (
        c.submit(c.enroll_job("acme", "bad-missing", [f"s3://{dep.input_bucket}/tenants/acme/nope.jpg"], "k1")),
        "object_not_found",
    )
    submitted["unknown-key"] = (
        c.submit(c.enroll_job("acme", "bad-unknown-key", [dep.faces["obama"]], "nokey")),
        "unknown_key",
    )
    from worker.keys.providers import write_keyring
    from worker.keys.registry import KeyRegistry
    from worker.storage.client import ObjectStore

    write_keyring(dep.keyring, ["kr"])
    KeyRegistry(ObjectStore.from_settings(dep.settings.s3)).revoke_key("acme", "kr", reason="test", job_id=job_id("rk"))
    submitted["revoked-key"] = (
        c.submit(c.enroll_job("acme", "bad-revoked-key", [dep.faces["obama"]], "kr")),
        "revoked_key",
    )
    submitted["verify-no-template"] = (c.submit(c.verify_job("acme", "nobody", dep.faces["obama"])), "no_template")

    for name, (jid, code) in submitted.items():
        res = c.wait(jid, timeout=240)
        assert res.status == JobStatus.FAILED, (name, res)
        assert res.error.code == code, (name, res.error)
        assert "\\x" not in res.error.message and len(res.error.message) < 500, name  # no bytes echoed
        subject = getattr(res, "subject", None)
        if subject:
            _nothing_written(dep, subject)

    # still the same worker processes, and still serving real work
    assert (dep.worker.popen.pid, sorted(dep.worker.children())) == pids
    ok = c.run(c.enroll_job("acme", "after-bad", [dep.faces["obama"]], "k1"), timeout=180)
    assert ok.status == JobStatus.SUCCEEDED and ok.version == 1


def test_malformed_messages_are_refused_and_the_worker_keeps_serving(dep: Deployment) -> None:
    c = dep.client
    good = c.enroll_job("acme", "m1", [dep.faces["obama"]], "k1").model_dump(mode="json")
    cases = {
        "unknown-field": {**good, "job_id": job_id("m"), "colour": "blue"},
        "missing-field": {k: v for k, v in {**good, "job_id": job_id("m")}.items() if k != "images"},
        "bad-ref": {**good, "job_id": job_id("m"), "images": ["http://example.com/a.jpg"]},
        "wrong-kind": {**good, "job_id": job_id("m"), "kind": "verify"},
        "bad-schema": {**good, "job_id": job_id("m"), "schema_version": 99},
    }
    handles = {name: c.app.send_task(TASK_ENROLL, args=[body], queue=ENGINE_QUEUE) for name, body in cases.items()}
    handles["not-a-dict"] = c.app.send_task(TASK_ENROLL, args=["enroll everyone"], queue=ENGINE_QUEUE)
    handles["two-args"] = c.app.send_task(TASK_VERIFY, args=[good, good], queue=ENGINE_QUEUE)
    handles["extra-kwarg"] = c.app.send_task(TASK_ENROLL, args=[good], kwargs={"x": 1}, queue=ENGINE_QUEUE)
    for name, h in handles.items():
        out = h.get(timeout=120)
        assert out["status"] == "failed" and out["error"]["code"] == "malformed_job", (name, out)
    # an untrusted serializer never reaches the task code (JSON only), and does not take the worker down
    c.app.send_task(TASK_ENROLL, args=[good], queue=ENGINE_QUEUE, serializer="pickle")
    _nothing_written(dep, "m1")
    ok = c.run(c.enroll_job("acme", "after-malformed", [dep.faces["obama"]], "k1"), timeout=180)
    assert ok.status == JobStatus.SUCCEEDED
    _nothing_written(dep, "m1")
    assert dep.worker.alive()
    assert "content type refused (JSON only; never deserialised)" in dep.worker.log.read_text(errors="replace")
