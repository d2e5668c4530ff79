"""The CLI paths a user takes after the walk-through, against a real worker, Redis and SeaweedFS: key management
(`keys add|list|show|rotate`, the README's rotation), `fetch` of a version's files, `--no-wait` output, `status`
lines, error messages that name the user's own file, and the worker's log lines for those jobs. Also a
100-megapixel phone-size JPEG enrolled with bounded worker memory."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_harness import REPO, Deployment, running

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "producers.cli"]


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def _local_faces(dep: Deployment, tmp: Path) -> dict[str, Path]:
    out = {}
    for name, ref in dep.faces.items():
        bucket, key = ref[5:].split("/", 1)
        out[name] = tmp / f"{name}.jpg"
        out[name].write_bytes(dep.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    return out


def _material(keyring: Path) -> list[str]:
    keys = json.loads(keyring.read_text())["keys"]
    raw = [base64.b64decode(v["b64"]) for v in keys.values()]
    return [v["b64"] for v in keys.values()] + [r.hex() for r in raw]


def test_keys_rotation_fetch_no_wait_status_and_logs(dep: Deployment, tmp_path: Path) -> None:
    env = dict(dep.env)
    photos = _local_faces(dep, tmp_path)
    outputs: list[str] = []

    def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        r = cli(list(args), env)
        outputs.extend([r.stdout, r.stderr])
        assert r.returncode == code, (args, r.returncode, r.stdout, r.stderr, dep.worker.tail())
        return r

    # --- keys: add / list / show; material generated, file stays 0600, nothing printed ----------------------------
    r = run("keys", "add", "k3")
    assert f"added key k3 to {dep.keyring}" in r.stdout
    assert stat.S_IMODE(dep.keyring.stat().st_mode) == 0o600
    assert "already in" in run("keys", "add", "k3").stdout
    assert [line.split()[0] for line in run("keys", "list").stdout.splitlines()[1:]] == ["k1", "k2", "k3"]
    listed = json.loads(run("keys", "list", "--json").stdout)
    assert [k["key_id"] for k in listed["keys"]] == ["k1", "k2", "k3"] and listed["provider"] == "local"
    assert "active" in run("keys", "show", "k3", "--tenant", "acme").stdout
    run("keys", "show", "nope", code=6)

    # --- enrol with --no-wait: stdout is exactly the job reference (tenant/job ID); uploads on stderr -------------
    r = run("enroll", "--tenant", "acme", "--subject", "obama", "--key", "k1", str(photos["obama"]),
            str(photos["obama2"]), "--no-wait")  # fmt: skip
    jid = r.stdout.strip()
    assert r.stdout == jid + "\n" and re.fullmatch(r"acme/[0-9a-f]{32}", jid), r.stdout
    assert r.stderr.count("uploaded ") == 2, r.stderr
    dep.client.wait(jid, timeout=240)
    st = run("status", jid).stdout
    assert f"job {jid}: succeeded (attempts 1)" in st and "?" not in st and "total" not in st, st

    # --- fetch: the version's images, template record and manifest as files --------------------------------------
    out = tmp_path / "fetched"
    r = run("fetch", "--tenant", "acme", "--subject", "obama", str(out))
    assert "fetched version 1 of acme/obama (key k1 v1)" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    names = sorted(p.name for p in out.iterdir())
    assert names == ["image-00.png", "image-01.png", "manifest.json", "template.json"], names
    for i, art in enumerate(manifest["images"]):
        assert hashlib.sha256((out / f"image-{i:02d}.png").read_bytes()).hexdigest() == art["sha256"]
    template = json.loads((out / "template.json").read_text())
    assert (template["key_id"], template["key_version"], template["subject"]) == ("k1", 1, "obama")
    assert hashlib.sha256((out / "template.json").read_bytes()).hexdigest() != "" and "embedding" in template
    run("fetch", "--tenant", "acme", "--subject", "obama", str(out), code=2)  # files in the way
    run("fetch", "--tenant", "acme", "--subject", "obama", "--version", "9", str(tmp_path / "v9"), code=6)

    # --- the README's rotation: unknown new key first, then `keys add`, then the same command works ---------------
    rotate = ["revoke", "--tenant", "acme", "--key", "k1", "--new-key", "k4", "--reason", "key rotated"]
    r = run(*rotate, code=2)  # bad input: nothing was changed
    assert "unknown_key" in r.stdout and "cancelable keys add k4" in r.stdout, r.stdout
    run("keys", "add", "k4")
    r = run(*rotate[:-1], "key rotated again")  # a new job: the first one's result is final
    assert "subjects 1/1 reissued, 0 failed" in r.stdout, r.stdout
    subj = json.loads(run("subject", "--tenant", "acme", "--subject", "obama", "--json").stdout)
    assert (subj["key_id"], subj["key_version"], subj["current_version"]) == ("k4", 1, 2)
    assert "revoked (key rotated again" in run("keys", "show", "k1", "--tenant", "acme").stdout

    # `keys rotate` picks the next key ID, adds it and reissues
    r = run("keys", "rotate", "--tenant", "acme", "--key", "k4", "--reason", "yearly rotation")
    assert "added key k5" in r.stdout and "subjects 1/1 reissued" in r.stdout, r.stdout
    subj = json.loads(run("subject", "acme", "obama", "--json").stdout)  # the positional form still works
    assert (subj["key_id"], subj["current_version"]) == ("k5", 3)

    # --- bad photos: the user's own file named, accurate messages ------------------------------------------------
    from PIL import Image

    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (320, 240), (90, 120, 150)).save(blank, quality=90)
    r = run("verify", "--tenant", "acme", "--subject", "obama", str(blank), code=1)
    assert f"no_face: {blank}" in r.stdout and "s3://" not in r.stdout.split("verify ", 1)[1], r.stdout
    failed_jid = r.stdout.split("verify ", 1)[1].split(":", 1)[0]
    (tmp_path / "empty.jpg").write_bytes(b"")
    r = run("upload", "--tenant", "acme", str(tmp_path / "empty.jpg"), code=2)
    assert "empty file (0 bytes)" in r.stderr
    r = run("enroll", "--tenant", "acme", "--subject", "x", "--key", "k1", str(tmp_path), code=2)
    assert "is a directory, not a photo" in r.stderr
    r = run("revoke", "--tenant", "acme", "--subject", "obama", code=2)
    assert "required: --reason" in r.stderr

    # --- no key material in anything the CLI printed ------------------------------------------------------------
    text = "\n".join(outputs)
    assert not [m for m in _material(dep.keyring) if m in text]

    # --- the worker's log: one outcome line per job, at its level, with the job's scope ---------------------------
    # log lines name a job by its ID; its tenant is in the line's scope
    jid, failed_jid = jid.split("/")[-1], failed_jid.split("/")[-1]
    deadline = time.monotonic() + 10
    while f"job {failed_jid} failed" not in dep.worker.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = dep.worker.log.read_text(errors="replace").splitlines()
    for job in (jid, failed_jid):
        mine = [line for line in lines if job in line]
        assert mine and all(f"[job {job} " in line and "tenant acme]" in line for line in mine), mine
        assert not any("Task " in line for line in mine), mine  # Celery's own received/succeeded lines
    failed = [line for line in lines if failed_jid in line]
    assert any(" WARNING " in line and f"job {failed_jid} failed: no_face after" in line for line in failed), failed
    assert not any("succeeded" in line for line in failed), failed
    assert any(" INFO " in line and f"job {jid} succeeded in" in line for line in lines)
    assert any("engine batch: enroll" in line for line in lines if f"[job {jid} " in line)  # the batcher thread too
    assert not any("'status': 'succeeded'" in line or '"status": "succeeded"' in line for line in lines)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(600)
def test_a_100_megapixel_jpeg_enrols_with_bounded_worker_memory(dep: Deployment, tmp_path: Path) -> None:
    """A phone-size photo (a sample face scaled up to 100 megapixels) passes the CLI's checks and enrols; the worker's
    pool process peaks under 1.5 GB (the JPEG is decoded at 1/2 scale and downscaled before detection)."""
    from PIL import Image

    photos = _local_faces(dep, tmp_path)
    big = tmp_path / "big.jpg"
    with Image.open(photos["obama"]) as im:
        w, h = im.size
        f = (100e6 / (w * h)) ** 0.5
        im.convert("RGB").resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR).save(big, quality=80)
    with Image.open(big) as im:
        assert im.size[0] * im.size[1] >= 99e6
    (child,) = dep.worker.children()
    before = _peak_rss_mb(child)
    r = cli(["enroll", "--tenant", "acme", "--subject", "big", "--key", "k1", str(big), str(photos["obama2"])], dep.env)
    assert r.returncode == 0, (r.stdout, r.stderr, dep.worker.tail())
    peak = _peak_rss_mb(child)
    print(f"worker pool process peak RSS: {before:.0f} MB before, {peak:.0f} MB after the 100 MP enrolment")
    assert peak < 1536, f"peak RSS {peak:.0f} MB"

    # over the JPEG pixel limit: refused by the CLI before anything is uploaded
    env = {**dep.env, "CANCELABLE_WORKER__MAX_PIXELS": "50000000"}
    r = cli(["upload", "--tenant", "acme", str(big)], env)
    assert r.returncode == 2 and "megapixels, more than the 50 a worker accepts" in r.stderr, r.stderr
    assert "uploaded" not in r.stdout and os.path.getsize(big) > 0
