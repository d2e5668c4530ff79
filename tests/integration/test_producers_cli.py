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
        (["enroll", "--tenant", "t", "--subject", "s", "--key", "k", "/local/file.jpg"], "s3://"),
        (["enroll", "--tenant", "t", "--subject", "a/b", "--key", "k", "s3://bkt/x.jpg"], "subject"),
        (["enroll", "--tenant", "t", "--subject", "s", "--key", "k"], "missing"),
        (["verify", "--tenant", "t", "--subject", "s", "s3://bkt/"], "key"),
        (["revoke", "--tenant", "t", "--reason", "r"], "exactly one of subject and key_id"),
        (["revoke", "--tenant", "t", "--key", "k1", "--reason", "r"], "new_key_id"),
        (["bulk", "--tenant", "t", "--key", "k", "manifest.txt"], "format"),
        (["status", "../etc"], "job_id"),
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


def test_unreachable_queue_exits_4() -> None:
    r = cli(
        ["enroll", "--tenant", "t", "--subject", "s", "--key", "k", "s3://bkt/x.jpg", "--timeout", "5"], timeout=120
    )
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "cannot reach the queue" in r.stderr


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
    assert "item/s" in r.stderr or "it/s" in r.stderr or "4/4" in r.stderr  # the tqdm bar drew

    r = cli(["status", jid, "--json"], env)
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

    r = cli(["status", jid], env)
    assert r.returncode == 0 and "total 4, succeeded 2, failed 2, pending 0" in r.stdout, r.stdout
