"""The ``cancelable`` CLI as a user runs it (a subprocess): bad input refused before anything is queued (exit 2,
one line), enroll / verify / bulk / status against a real worker, bulk progress counted by state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from worker_harness import REPO, Deployment, job_id, running

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


CLI = [sys.executable, "-m", "producers.cli"]


def cli(
    args: list[str], env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    import os

    e = env or {
        **{k: v for k, v in os.environ.items() if not k.startswith("CANCELABLE_")},
        "PYTHONPATH": str(REPO),
        "CANCELABLE_REDIS__URL": "redis://127.0.0.1:1/0",
    }
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=e, input=stdin, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["enroll", "--tenant", "t", "--subject", "s", "--key", "k", "s3://UPPER/x.jpg"], "bucket"),
        (["enroll", "--tenant", "t", "--subject", "s", "--key", "k", "/local/file.jpg"], "no such file"),
        (["verify", "--tenant", "t", "--subject", "s", "pyproject.toml"], "not a JPEG, PNG or WebP image"),
        (["upload", "--tenant", "t", "/local/file.jpg"], "no such file"),
        (["upload", "--tenant", "a/b", "pyproject.toml"], "tenant"),
        (["subject", "acme", "../x"], "subject"),
        (["enroll", "--tenant", "t", "--subject", "a/b", "--key", "k", "s3://bkt/x.jpg"], "subject"),
        (["enroll", "--tenant", "t", "--subject", "s", "--key", "k"], "missing"),
        (["verify", "--tenant", "t", "--subject", "s", "s3://bkt/"], "key"),
        (["revoke", "--tenant", "t", "--reason", "r"], "exactly one of subject and key_id"),
        (["revoke", "--tenant", "t", "--key", "k1", "--reason", "r"], "new_key_id"),
        (["bulk", "--tenant", "t", "--key", "k", "manifest.txt"], "format"),
        (["status", "../etc"], "TENANT/JOB_ID"),
        (["status", "abcdefgh1234"], "TENANT/JOB_ID"),  # a bare job ID names no job: IDs are unique per tenant
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    r = cli(args, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cancelable: error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_unknown_field_in_job_file_is_refused() -> None:
    job = {
        "kind": "enroll",
        "job_id": "abcdefgh1234",
        "tenant": "t",
        "subject": "s",
        "images": ["s3://bkt/a.jpg"],
        "key_id": "k",
        "priority": "high",
    }
    r = cli(["enroll", "--job-file", "-"], stdin=json.dumps(job), timeout=60)
    assert r.returncode == 2 and "priority" in r.stderr and "Extra inputs" in r.stderr, r.stderr
    r = cli(["enroll", "--job-file", "-"], stdin="{not json", timeout=60)
    assert r.returncode == 2 and "not JSON" in r.stderr


def test_no_redis_configured_exits_2_and_names_the_variable() -> None:
    """Issue 10 item 14: no silent fallback to redis://127.0.0.1:6379 (someone else's Redis)."""
    import os

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CANCELABLE_")}, "PYTHONPATH": str(REPO)}
    r = cli(
        ["enroll", "--tenant", "t", "--subject", "s", "--key", "k", "s3://bkt/x.jpg", "--timeout", "5"], env, timeout=60
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "CANCELABLE_REDIS__URL: not set" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unreachable_queue_exits_4() -> None:
    r = cli(
        ["enroll", "--tenant", "t", "--subject", "s", "--key", "k", "s3://bkt/x.jpg", "--timeout", "5"], timeout=120
    )
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "cannot reach the queue" in r.stderr


def test_unreachable_queue_uploads_nothing(dep: Deployment, tmp_path: Path) -> None:
    """Redis down, S3 up: exit 4 before the first upload, so no photo is left in the input bucket."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    photo = tmp_path / "probe.jpg"
    photo.write_bytes(dep.s3.get_object(Bucket=dep.input_bucket, Key="tenants/acme/obama.jpg")["Body"].read())

    def uploads() -> list[str]:
        got = dep.s3.list_objects_v2(Bucket=dep.input_bucket, Prefix="tenants/acme/uploads/")
        return [o["Key"] for o in got.get("Contents", [])]

    before = uploads()
    env = {**dep.env, "CANCELABLE_REDIS__URL": f"redis://127.0.0.1:{dead}/0"}
    r = cli(["verify", "--tenant", "acme", "--subject", "obama", str(photo), "--timeout", "5"], env, timeout=120)
    assert r.returncode == 4 and "cannot reach the queue" in r.stderr, (r.stdout, r.stderr)
    assert uploads() == before


def test_cli_enroll_verify_bulk_status(dep: Deployment, tmp_path: Path) -> None:
    env = {**dep.env}
    f = dep.faces

    r = cli(["enroll", "--tenant", "acme", "--subject", "obama", "--key", "k1", f["obama"], f["obama2"]], env)
    assert r.returncode == 0, r.stderr
    assert "succeeded; version 1 of acme/obama (key k1 v1)" in r.stdout
    assert f"s3://{dep.bucket}/tenants/acme/subjects/obama/versions/0000000001.json" in r.stdout

    r = cli(["verify", "--tenant", "acme", "--subject", "obama", f["obama3"], "--json"], env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "succeeded" and out["decision"] in ("accept", "reject") and out["version"] == 1

    # bulk from a local CSV: 3 subjects (one with two images), one bad ref row, one missing object
    bad_img = dep.upload_input("acme", "bulk/garbage.jpg", b"not an image")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "subject,image\n"
        f"b1,{f['obama']}\n"
        f"b1,{f['obama2']}\n"
        f"b2,{f['biden']}\n"
        f"b3,{bad_img}\n"
        f"b4,s3://{dep.input_bucket}/tenants/acme/bulk/missing.jpg\n"
    )
    jid = job_id("bulk")
    r = cli(["bulk", "--tenant", "acme", "--key", "k1", str(manifest), "--chunk-size", "2", "--job-id", jid], env)
    assert r.returncode == 1, (r.stdout, r.stderr)  # some rows failed
    assert "2 succeeded, 2 failed of 4" in r.stdout, r.stdout
    assert "line 5: b3: invalid_image: " in r.stdout and "line 6: b4: object_not_found: " in r.stdout, r.stdout
    assert f"report s3://{dep.bucket}/tenants/acme/jobs/{jid}/report.jsonl" in r.stdout
    up = dep.s3.list_objects_v2(Bucket=dep.input_bucket, Prefix="tenants/acme/manifests/")["Contents"]
    assert [o["Key"] for o in up] == [f"tenants/acme/manifests/{jid}.csv"]  # the local manifest, in acme's inputs
    assert "item/s" in r.stderr or "it/s" in r.stderr or "4/4" in r.stderr  # the tqdm bar drew

    r = cli(["status", jid, "--tenant", "acme", "--json"], env)  # a job ID with its tenant (IDs are per tenant)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    p = st["progress"]
    assert st["state"] == "failed" and p["total"] == 4 and p["succeeded"] == 2 and p["failed"] == 2
    assert p["failed_codes"] == {"invalid_image": 1, "object_not_found": 1}
    for s, n in (("b1", 2), ("b2", 1)):
        man = json.loads(
            dep.s3.get_object(Bucket=dep.bucket, Key=f"tenants/acme/subjects/{s}/versions/0000000001.json")[
                "Body"
            ].read()
        )
        assert len(man["images"]) == n

    # the same bulk job again (a restarted producer): nothing new is enrolled, same counts
    r = cli(["bulk", "--tenant", "acme", "--key", "k1", str(manifest), "--chunk-size", "2", "--job-id", jid], env)
    assert "2 succeeded, 2 failed of 4" in r.stdout
    keys = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix="tenants/acme/subjects/b1/versions/")["Contents"]
    assert len(keys) == 1

    r = cli(["status", f"acme/{jid}"], env)
    assert r.returncode == 0 and "total 4, succeeded 2, failed 2, pending 0" in r.stdout, r.stdout


def test_cli_local_photos_subject_status_and_exit_codes(dep: Deployment, tmp_path: Path) -> None:
    """Local photos are uploaded to the tenant's input prefix (printed) and enrolled; verify exits 0 on ACCEPT and
    5 on REJECT; `subject` shows current version, key version and revoked versions; unknown job / subject exit 6;
    revoking an unknown subject fails with a clear message (no "new version None")."""
    import hashlib

    env = {**dep.env}
    faces = {
        n: dep.s3.get_object(Bucket=ref[5:].split("/", 1)[0], Key=ref[5:].split("/", 1)[1])["Body"].read()
        for n, ref in dep.faces.items()
    }
    for n, body in faces.items():
        (tmp_path / f"{n}.jpg").write_bytes(body)
    a, b, probe = (str(tmp_path / f"{n}.jpg") for n in ("obama", "obama2", "obama3"))
    inputs = f"s3://{dep.input_bucket}/tenants/acme/uploads/"

    r = cli(["upload", "--tenant", "acme", a], env)
    assert r.returncode == 0, r.stderr
    uploaded = r.stdout.strip()
    assert uploaded == f"{inputs}{hashlib.sha256(faces['obama']).hexdigest()[:32]}.jpg"
    key = uploaded[5:].split("/", 1)[1]
    assert dep.s3.get_object(Bucket=dep.input_bucket, Key=key)["Body"].read() == faces["obama"]

    r = cli(["enroll", "--tenant", "acme", "--subject", "obama", "--key", "k1", a, b], env)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"uploaded {a} -> {uploaded}" in r.stdout and f"uploaded {b} -> {inputs}" in r.stdout
    assert "succeeded; version 1 of acme/obama (key k1 v1)" in r.stdout

    # thresholds at the ends of the cosine range make the decision certain with any model
    r = cli(["verify", "--tenant", "acme", "--subject", "obama", probe, "--threshold", "-1"], env)
    assert r.returncode == 0 and "-> ACCEPT" in r.stdout, (r.stdout, r.stderr)
    r = cli(["verify", "--tenant", "acme", "--subject", "obama", probe, "--threshold", "1", "--json"], env)
    assert r.returncode == 5, (r.stdout, r.stderr)
    out = json.loads(r.stdout)  # uploads went to stderr: stdout is pure JSON
    assert out["decision"] == "reject" and f"uploaded {probe}" in r.stderr

    r = cli(["verify", "--tenant", "acme", "--subject", "obama", probe, "--no-wait"], env)
    jid = r.stdout.strip().splitlines()[-1]
    r = cli(["status", jid], env)
    assert r.returncode == 0 and f"job {jid}: " in r.stdout, (r.stdout, r.stderr)
    assert "unknown" not in r.stdout
    r = cli(["status", f"acme/{job_id('never')}"], env)
    assert r.returncode == 6 and "unknown job" in r.stderr, (r.stdout, r.stderr)

    r = cli(["subject", "acme", "obama"], env)
    assert r.returncode == 0, r.stderr
    assert "current version  1 (key k1 v1," in r.stdout and "key version      k1 v1" in r.stdout
    assert "revoked versions none" in r.stdout
    r = cli(["subject", "acme", "nobody"], env)
    assert r.returncode == 6 and "no subject acme/nobody" in r.stderr

    r = cli(["revoke", "--tenant", "acme", "--subject", "nobody", "--reason", "typo"], env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no_template" in r.stdout and "nothing is enrolled for acme/nobody" in r.stdout
    assert "None" not in r.stdout

    r = cli(["revoke", "--tenant", "acme", "--subject", "obama", "--reason", "template leaked"], env)
    assert r.returncode == 0 and "-> new version 2 (key k1 v2)" in r.stdout, (r.stdout, r.stderr)
    r = cli(["subject", "acme", "obama", "--json"], env)
    st = json.loads(r.stdout)
    assert (st["current_version"], st["key_id"], st["key_version"]) == (2, "k1", 2)
    assert st["revoked_versions"] == [1] and st["revoked"][0]["reason"] == "template leaked"
    assert st["revoked"][0]["replaced_by"] == 2 and st["versions"] == [1, 2]
