"""Key providers against real services: the local keyring, AWS KMS HMAC keys on moto's server, subject key versions
and key state in SeaweedFS, and scans proving key material and seeds never reach logs, exceptions, S3 or Redis."""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import stat
import threading
import uuid

import pytest

from worker.errors import KeyError_, KeyProviderUnavailable, RevokedKeyError, UnknownKeyError
from worker.keys.derive import derivation_message, derive_seed
from worker.keys.providers import KmsHmacProvider, LocalKeyring, make_key_provider, write_keyring
from worker.keys.registry import KeyRegistry
from worker.storage import ObjectStore, TemplateStore


def _material(path, key_id: str) -> bytes:
    return base64.b64decode(json.loads(path.read_text())["keys"][key_id]["b64"])


def _kms_client(endpoint: str):
    import boto3

    return boto3.client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# --- local keyring -------------------------------------------------------------------------------------------------
def test_keyring_file_created_private_and_seeds_match_derive(tmp_path):
    path = tmp_path / "sub" / "keyring.json"
    assert write_keyring(path, ["k1", "k2"]) == ["k1", "k2"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert write_keyring(path, ["k1", "k3"]) == ["k3"]  # existing keys never change
    m1 = _material(path, "k1")
    assert len(m1) == 32 and m1 != _material(path, "k2")
    ring = LocalKeyring(path)
    assert ring.key_ids() == ["k1", "k2", "k3"]
    s = ring.seed_for("k1", "acme", "alice", 1)
    assert s == derive_seed(m1, "acme", "alice", 1) and len(s) == 32
    assert s != ring.seed_for("k1", "acme", "alice", 2) != ring.seed_for("k2", "acme", "alice", 1)
    assert s != ring.seed_for("k1", "acme", "bob", 1)
    with pytest.raises(UnknownKeyError):
        ring.seed_for("nope", "acme", "alice", 1)


def test_keyring_refuses_readable_files_and_pickling(tmp_path):
    path = tmp_path / "keyring.json"
    write_keyring(path, ["k1"])
    material = _material(path, "k1")
    ring = LocalKeyring(path)
    assert material.hex() not in repr(ring) and base64.b64encode(material).decode() not in repr(ring)
    with pytest.raises(TypeError):
        pickle.dumps(ring)
    os.chmod(path, 0o644)
    with pytest.raises(KeyProviderUnavailable):
        ring.seed_for("k1", "t", "s", 1)
    os.chmod(path, 0o600)
    path.write_text("{broken")
    os.chmod(path, 0o600)
    with pytest.raises(KeyProviderUnavailable) as ei:
        LocalKeyring(path).seed_for("k1", "t", "s", 1)
    assert "broken" not in str(ei.value)
    with pytest.raises(KeyProviderUnavailable):
        LocalKeyring(tmp_path / "missing.json").has_key("k1")


def test_keyring_reloads_when_keys_are_added(tmp_path):
    path = tmp_path / "keyring.json"
    write_keyring(path, ["a"])
    ring = LocalKeyring(path)
    assert not ring.has_key("b")
    write_keyring(path, ["b"])
    assert ring.has_key("b")


def test_concurrent_keyring_additions_keep_every_key(tmp_path):
    path = tmp_path / "keyring.json"
    write_keyring(path, ["base"])
    ids = [f"k{i}" for i in range(12)]
    barrier = threading.Barrier(len(ids))

    def add(k: str) -> None:
        barrier.wait()
        write_keyring(path, [k])

    threads = [threading.Thread(target=add, args=(k,)) for k in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert LocalKeyring(path).key_ids() == sorted(["base", *ids])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# --- registry: key state and subject key versions ------------------------------------------------------------------
def _registry(make_settings, s3_bucket) -> KeyRegistry:
    return KeyRegistry(ObjectStore.from_settings(make_settings(bucket=s3_bucket).s3))


def test_subject_key_versions_and_revocation_history(make_settings, s3_bucket):
    reg = _registry(make_settings, s3_bucket)
    assert reg.subject_key("t", "alice") is None
    r1 = reg.ensure_subject_key("t", "alice", "k1")
    assert (r1.key_id, r1.key_version) == ("k1", 1)
    assert reg.ensure_subject_key("t", "alice", "k1").key_version == 1
    with pytest.raises(KeyError_):
        reg.ensure_subject_key("t", "alice", "k2")
    job = uuid.uuid4().hex
    r2 = reg.bump_subject_key("t", "alice", reason="template leaked", job_id=job)
    assert (r2.key_id, r2.key_version) == ("k1", 2)
    assert r2.history[-1]["reason"] == "template leaked" and r2.history[-1]["key_version"] == 1
    assert "revoked_at" in r2.history[-1]
    assert reg.bump_subject_key("t", "alice", reason="again", job_id=job).key_version == 2  # idempotent per job
    r3 = reg.bump_subject_key("t", "alice", reason="key rotated", job_id=uuid.uuid4().hex, new_key_id="k2")
    assert (r3.key_id, r3.key_version) == ("k2", 1)
    r4 = reg.bump_subject_key("t", "alice", reason="back", job_id=uuid.uuid4().hex, new_key_id="k1")
    assert (r4.key_id, r4.key_version) == ("k1", 3)  # never reuses a version of a key
    with pytest.raises(KeyError_):
        reg.bump_subject_key("t", "nobody", reason="x", job_id=uuid.uuid4().hex)


def test_concurrent_bumps_lose_nothing(make_settings, s3_bucket):
    reg = _registry(make_settings, s3_bucket)
    reg.ensure_subject_key("t", "bob", "k1")
    jobs = [uuid.uuid4().hex for _ in range(6)]
    barrier = threading.Barrier(len(jobs))

    def bump(j: str) -> None:
        barrier.wait()
        reg.bump_subject_key("t", "bob", reason="r", job_id=j)

    threads = [threading.Thread(target=bump, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rec = reg.subject_key("t", "bob")
    assert rec.key_version == 7
    assert sorted(h["job_id"] for h in rec.history) == sorted(jobs)
    assert [h["key_version"] for h in rec.history] == [1, 2, 3, 4, 5, 6]


def test_revoked_key_refused_by_provider(make_settings, s3_bucket, tmp_path):
    settings = make_settings(bucket=s3_bucket, keys={"keyring_path": str(tmp_path / "kr.json")})
    write_keyring(settings.keys.keyring_path, ["k1", "k2"])
    store = ObjectStore.from_settings(settings.s3)
    prov = make_key_provider(settings, store)
    assert isinstance(prov, LocalKeyring)
    prov.seed_for("k1", "t", "s", 1)
    rec = prov.registry.revoke_key("t", "k1", reason="compromised", job_id=uuid.uuid4().hex)
    assert rec.state == "revoked" and rec.tenant == "t"
    assert prov.registry.revoke_key("t", "k1", reason="other", job_id=uuid.uuid4().hex).reason == "compromised"
    with pytest.raises(RevokedKeyError):
        prov.seed_for("k1", "t", "s", 1)
    prov.seed_for("k2", "t", "s", 1)
    # revocation is per tenant: another tenant's use of the same key ID is untouched
    prov.seed_for("k1", "other-tenant", "s", 1)
    assert not prov.registry.is_revoked("other-tenant", "k1")


# --- AWS KMS on moto -----------------------------------------------------------------------------------------------
def test_kms_hmac_seeds(moto_kms):
    prov = KmsHmacProvider(endpoint_url=moto_kms, access_key_id="testing", secret_access_key="testing")
    k1 = prov.create_key()
    alias = prov.create_key(alias=f"seed-{uuid.uuid4().hex[:8]}")
    s = prov.seed_for(k1, "acme", "alice", 1)
    assert len(s) == 32 and s == prov.seed_for(k1, "acme", "alice", 1)
    assert s != prov.seed_for(k1, "acme", "alice", 2) != prov.seed_for(alias, "acme", "alice", 1)
    # the seed is KMS's HMAC-SHA256 over exactly the engine's derivation message
    kms = _kms_client(moto_kms)
    ok = kms.verify_mac(KeyId=k1, Message=derivation_message("acme", "alice", 1), Mac=s, MacAlgorithm="HMAC_SHA_256")
    assert ok["MacValid"]


def test_kms_errors(moto_kms, make_settings, s3_bucket):
    kms = _kms_client(moto_kms)
    prov = KmsHmacProvider(client=kms)
    with pytest.raises(UnknownKeyError):
        prov.seed_for(str(uuid.uuid4()), "t", "s", 1)
    aes = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    with pytest.raises(UnknownKeyError):
        prov.seed_for(aes, "t", "s", 1)
    disabled = prov.create_key()
    kms.disable_key(KeyId=disabled)
    with pytest.raises(RevokedKeyError):
        KmsHmacProvider(client=kms).seed_for(disabled, "t", "s", 1)
    # revoked in our registry (the key itself still works in KMS)
    settings = make_settings(
        bucket=s3_bucket,
        keys={
            "provider": "kms",
            "kms_endpoint_url": moto_kms,
            "kms_access_key_id": "testing",
            "kms_secret_access_key": "testing",
        },
    )
    p2 = make_key_provider(settings, ObjectStore.from_settings(settings.s3))
    assert isinstance(p2, KmsHmacProvider)
    live = p2.create_key()
    p2.seed_for(live, "t", "s", 1)
    p2.registry.revoke_key("t", live, reason="rotate", job_id=uuid.uuid4().hex)
    with pytest.raises(RevokedKeyError):
        p2.seed_for(live, "t", "s", 1)


def test_kms_key_map_names_the_kms_key_behind_each_key_id(moto_kms, make_settings, s3_bucket):
    """``keys.kms_key_map``: a job's key ID -> its KMS key; unmapped IDs are unknown; ``check_key_map`` (run at worker
    start) names the first entry whose KMS key is missing, disabled or not an HMAC key."""
    kms = _kms_client(moto_kms)
    direct = KmsHmacProvider(client=kms)
    k1 = direct.create_key()
    alias = direct.create_key(alias=f"seed-{uuid.uuid4().hex[:8]}")
    settings = make_settings(
        bucket=s3_bucket,
        keys={
            "provider": "kms",
            "kms_endpoint_url": moto_kms,
            "kms_access_key_id": "testing",
            "kms_secret_access_key": "testing",
            "kms_key_map": {"acme-2026": k1, "acme-2027": alias},
        },
    )
    prov = make_key_provider(settings)
    assert isinstance(prov, KmsHmacProvider) and prov.key_ids() == ["acme-2026", "acme-2027"]
    prov.check_key_map()
    assert prov.seed_for("acme-2026", "acme", "alice", 1) == direct.seed_for(k1, "acme", "alice", 1)
    assert prov.seed_for("acme-2027", "acme", "alice", 1) == direct.seed_for(alias, "acme", "alice", 1)
    with pytest.raises(UnknownKeyError, match="kms_key_map"):
        prov.seed_for(k1, "acme", "alice", 1)  # only mapped IDs are known, even a real KMS key ID

    aes = kms.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    disabled = direct.create_key()
    kms.disable_key(KeyId=disabled)
    for bad, exc in (("alias/no-such-key", UnknownKeyError), (aes, UnknownKeyError), (disabled, RevokedKeyError)):
        p = KmsHmacProvider(client=kms, key_map={"good": k1, "bad-entry": bad})
        with pytest.raises(exc, match="kms_key_map entry bad-entry"):
            p.check_key_map()


def test_worker_with_a_bad_kms_key_map_stops_at_start(moto_kms, service_env, tmp_path):
    from worker_harness import start_worker

    env = service_env()
    env.update(
        CANCELABLE_KEYS__PROVIDER="kms",
        CANCELABLE_KEYS__KMS_ENDPOINT_URL=moto_kms,
        CANCELABLE_KEYS__KMS_ACCESS_KEY_ID="testing",
        CANCELABLE_KEYS__KMS_SECRET_ACCESS_KEY="testing",
        CANCELABLE_KEYS__KMS_KEY_MAP=json.dumps({"acme-2026": "alias/never-created"}),
        CANCELABLE_METRICS__ENABLED="false",
    )
    w = start_worker(env, tmp_path / "worker.log", queues="control")
    try:
        rc = w.popen.wait(90)
    finally:
        w.stop()
    assert rc == 2, w.tail()
    assert "CANCELABLE_KEYS__KMS_KEY_MAP: keys.kms_key_map entry acme-2026" in w.tail(), w.tail()


def test_kms_unreachable_is_retryable():
    from tests.integration.conftest import free_ports

    (port,) = free_ports(1)
    prov = KmsHmacProvider(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="x", secret_access_key="y")
    with pytest.raises(KeyProviderUnavailable) as ei:
        prov.seed_for("alias/x", "t", "s", 1)
    assert ei.value.retryable


# --- leak scans ----------------------------------------------------------------------------------------------------
def test_key_material_and_seeds_never_leak(
    make_settings, s3_bucket, redis_url, moto_kms, seaweed, caplog, secret_scan, tmp_path
):
    """Run every key path (derive, enrol-commit, bump, revoke, error cases) with DEBUG logging on every logger, then
    scan logs, exception texts, every S3 object and every Redis key/value for the key material and the seeds."""
    import redis

    from tests.integration.test_storage_versions import _template

    caplog.set_level(logging.DEBUG)
    settings = make_settings(bucket=s3_bucket, keys={"keyring_path": str(tmp_path / "kr.json")})
    write_keyring(settings.keys.keyring_path, ["k1", "k2"])
    material = [_material(settings.keys.keyring_path, k) for k in ("k1", "k2")]
    store = ObjectStore.from_settings(settings.s3)
    local = make_key_provider(settings, store)
    kms = KmsHmacProvider(
        endpoint_url=moto_kms, access_key_id="testing", secret_access_key="testing", registry=local.registry
    )
    kms_key = kms.create_key()
    r = redis.Redis.from_url(redis_url)

    seeds, texts = [], []
    reg = local.registry
    ts = TemplateStore(store)
    for subject in ("alice", "bob"):
        rec = reg.ensure_subject_key("acme", subject, "k1")
        seed = local.seed_for(rec.key_id, "acme", subject, rec.key_version)
        seeds += [seed, kms.seed_for(kms_key, "acme", subject, 1)]
        r.hset(f"test:job:{subject}", mapping={"status": "succeeded", "key_id": rec.key_id})  # what tasks store
        j = uuid.uuid4().hex
        ts.commit_version("acme", subject, j, template=_template("acme", subject, j), images=[b"img"])
        rec = reg.bump_subject_key("acme", subject, reason="leak", job_id=uuid.uuid4().hex, new_key_id="k2")
        seeds.append(local.seed_for(rec.key_id, "acme", subject, rec.key_version))
    reg.revoke_key("acme", "k1", reason="compromised", job_id=uuid.uuid4().hex)
    for bad in (
        lambda: local.seed_for("k1", "acme", "alice", 1),
        lambda: local.seed_for("zz", "acme", "a", 1),
        lambda: kms.seed_for(str(uuid.uuid4()), "acme", "a", 1),
    ):
        try:
            bad()
        except Exception as e:
            texts += [str(e), repr(e)]
    assert len(texts) == 6
    texts += [rec.getMessage() for rec in caplog.records] + [caplog.text, repr(local), repr(kms)]
    assert any("botocore" in rec.name for rec in caplog.records)  # DEBUG logging really was on
    assert "<redacted: KMS secret output>" in caplog.text  # and the GenerateMac bodies were logged, redacted
    hits = secret_scan(material + seeds, texts=texts, s3=[(seaweed.client(), s3_bucket)], redis_urls=[redis_url])
    assert hits == []
    # the scanner itself finds a planted secret in each place
    r.set("test:planted", base64.b64encode(seeds[0]))
    store.put("planted.bin", material[0].hex().encode())
    planted = secret_scan(
        [seeds[0], material[0]],
        texts=[f"x {seeds[0].hex()} y"],
        s3=[(seaweed.client(), s3_bucket)],
        redis_urls=[redis_url],
    )
    assert len(planted) == 3
    r.delete("test:planted")
