"""Revocation against a real worker: a new key version and template version, the old version marked revoked, its
template unlinkable to the new one; whole-key revocation fans out over every subject under the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from worker_harness import Deployment, running

from worker.contracts import JobStatus

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(service_env, seaweed, tmp_path: Path):
    yield from running(service_env, seaweed, tmp_path)


def _json(dep: Deployment, key: str) -> dict:
    return json.loads(dep.s3.get_object(Bucket=dep.bucket, Key=key)["Body"].read())


def _template(dep: Deployment, subject: str, version: int) -> np.ndarray:
    from worker.storage.records import TemplateRecord

    man = _json(dep, f"tenants/acme/subjects/{subject}/versions/{version:010d}.json")
    rec = TemplateRecord.model_validate(_json(dep, man["template"]["key"]))
    return rec.vector()


def test_revoke_subject_reissues_and_marks_old_revoked(dep: Deployment) -> None:
    f = dep.faces
    c = dep.client
    enrolled = c.run(c.enroll_job("acme", "obama", [f["obama"], f["obama2"]], "k1"), timeout=180)
    assert enrolled.status == JobStatus.SUCCEEDED and enrolled.version == 1

    seen = []
    rev = c.run(c.revoke_job("acme", "leaked in a breach", subject="obama"), timeout=300, on_progress=seen.append)
    assert rev.status == JobStatus.SUCCEEDED, rev
    assert rev.revoked_versions == [1] and rev.new_version == 2
    assert rev.new_key_id == "k1" and rev.new_key_version == 2
    assert rev.subjects_total == 1 and rev.subjects_done == 1 and rev.subjects_failed == 0
    assert seen and seen[-1].total == 1 and seen[-1].succeeded == 1

    # S3: pointer on 2, version 2 under key version 2, a revocation record for 1 with the reason
    assert _json(dep, "tenants/acme/subjects/obama/current.json")["version"] == 2
    man2 = _json(dep, "tenants/acme/subjects/obama/versions/0000000002.json")
    assert (man2["key_id"], man2["key_version"]) == ("k1", 2)
    assert [s["uri"] for s in man2["source_images"]] == [f["obama"], f["obama2"]]
    rec = _json(dep, "tenants/acme/subjects/obama/revocations/0000000001.json")
    assert rec["reason"] == "leaked in a breach" and rec["replaced_by"] == 2 and rec["key_version"] == 1
    key_rec = _json(dep, "tenants/acme/subjects/obama/key.json")
    assert key_rec["key_version"] == 2 and key_rec["history"][-1]["reason"] == "leaked in a breach"
    # the old template differs from the new one (different key version -> different synthetic identity);
    # with the random test bundle the templates are near-constant, so only inequality is asserted here
    t1, t2 = _template(dep, "obama", 1), _template(dep, "obama", 2)
    assert not np.array_equal(t1, t2)

    # verify now runs against version 2
    v = c.run(c.verify_job("acme", "obama", f["obama3"]), timeout=180)
    assert v.status == JobStatus.SUCCEEDED and v.version == 2 and v.key_version == 2

    # the same revoke job again: the stored result, no third version
    again = c.run(c.revoke_job("acme", "leaked in a breach", subject="obama", job_id=rev.job_id), timeout=60)
    assert again.new_version == 2
    keys = dep.s3.list_objects_v2(Bucket=dep.bucket, Prefix="tenants/acme/subjects/obama/versions/")["Contents"]
    assert len(keys) == 2

    st = c.status(rev.ref)
    assert st["state"] == "succeeded" and st["progress"]["succeeded"] == 1 and st["progress"]["pending"] == 0


def test_revoke_whole_key_fans_out_and_purges(dep: Deployment) -> None:
    f = dep.faces
    c = dep.client
    for subject, imgs in (("a1", [f["obama"]]), ("a2", [f["obama2"]]), ("b1", [f["biden"]])):
        key = "k2" if subject == "b1" else "k1"
        r = c.run(c.enroll_job("acme", subject, imgs, key), timeout=180)
        assert r.status == JobStatus.SUCCEEDED, r
    from worker.keys.providers import write_keyring

    write_keyring(dep.keyring, ["k3"])
    rev = c.run(
        c.revoke_job("acme", "key k1 compromised", key_id="k1", new_key_id="k3", purge_old_images=True), timeout=300
    )
    assert rev.status == JobStatus.SUCCEEDED, rev
    assert rev.subjects_total == 2 and rev.subjects_done == 2
    for s in ("a1", "a2"):
        man = _json(dep, f"tenants/acme/subjects/{s}/versions/0000000002.json")
        assert (man["key_id"], man["key_version"]) == ("k3", 1)
        old = _json(dep, f"tenants/acme/subjects/{s}/versions/0000000001.json")
        rec = _json(dep, f"tenants/acme/subjects/{s}/revocations/0000000001.json")
        assert rec["images_purged"] is True
        for a in old["images"]:  # purged by policy; the manifest and template stay as the audit record
            with pytest.raises(dep.s3.exceptions.ClientError):
                dep.s3.head_object(Bucket=dep.bucket, Key=a["key"])
        dep.s3.head_object(Bucket=dep.bucket, Key=old["template"]["key"])
    # b1 (under k2) untouched
    assert _json(dep, "tenants/acme/subjects/b1/current.json")["version"] == 1
    # the revoked key refuses new enrolments
    bad = c.run(c.enroll_job("acme", "new1", [f["obama3"]], "k1"), timeout=120)
    assert bad.status == JobStatus.FAILED and bad.error.code == "revoked_key"


def test_no_key_material_or_seed_in_redis_s3_logs_or_results(dep: Deployment) -> None:
    """Run every job kind, then scan everything the system wrote for the key material and the derived seeds."""
    import base64

    from worker.keys.derive import derive_seed

    f = dep.faces
    c = dep.client
    results = [
        c.run(c.enroll_job("acme", "scan", [f["obama"], f["obama2"]], "k1"), timeout=180),
        c.run(c.verify_job("acme", "scan", f["obama3"]), timeout=180),
        c.run(c.revoke_job("acme", "scan test", subject="scan"), timeout=300),
    ]
    assert all(r.status == JobStatus.SUCCEEDED for r in results), results
    ring = json.loads(dep.keyring.read_text())["keys"]
    material = [base64.b64decode(v["b64"]) for v in ring.values()]
    seeds = [derive_seed(m, "acme", "scan", v) for m in material for v in (1, 2)]
    needles: list[bytes] = []
    for secret in material + seeds:
        needles += [secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret).rstrip(b"=")]

    blobs: dict[str, bytes] = {"worker.log": dep.worker.log.read_bytes()}
    blobs.update({f"result:{r.job_id}": r.model_dump_json().encode() for r in results})
    for key in dep.client.redis.scan_iter(count=500):
        t = dep.client.redis.type(key).decode()
        r = dep.client.redis
        if t == "string":
            val = r.get(key)
        elif t == "hash":
            val = b"".join(k + v for k, v in r.hgetall(key).items())
        elif t == "list":
            val = b"".join(r.lrange(key, 0, -1))
        elif t == "set":
            val = b"".join(r.smembers(key))
        elif t == "zset":
            val = b"".join(m for m, _ in r.zrange(key, 0, -1, withscores=True))
        else:
            continue
        blobs[f"redis:{key.decode(errors='replace')}"] = key + (val or b"")
    for page in dep.s3.get_paginator("list_objects_v2").paginate(Bucket=dep.bucket):
        for o in page.get("Contents", []):
            blobs[f"s3:{o['Key']}"] = dep.s3.get_object(Bucket=dep.bucket, Key=o["Key"])["Body"].read()
    assert len(blobs) > 20
    leaks = [name for name, blob in blobs.items() for n in needles if n in blob]
    assert leaks == []
