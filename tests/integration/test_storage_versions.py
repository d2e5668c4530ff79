"""Template versions on a real SeaweedFS: conditional writes, atomic commit, idempotency per job, monotonic
pointer, readers never seeing half-written versions, SSE parameters, revocations, dead letters, bundle sync."""

from __future__ import annotations

import hashlib
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from worker.errors import NoTemplateError, ObjectNotFoundError, StorageError, VersionConflictError
from worker.storage import (
    DeadLetter,
    ObjectStore,
    SourceImage,
    TemplateRecord,
    TemplateStore,
    layout,
    read_dead_letter,
    sync_bundle,
    write_dead_letter,
)
from worker.storage.client import make_s3_client

D = 8


def _store(make_settings, bucket: str, **s3) -> ObjectStore:
    st = make_settings(bucket=bucket, s3=s3) if s3 else make_settings(bucket=bucket)
    return ObjectStore.from_settings(st.s3)


def _template(tenant: str, subject: str, job_id: str, n: int = 2, seed: int = 0) -> TemplateRecord:
    rng = np.random.default_rng(seed)
    from worker.storage import encode_embedding

    embs = rng.standard_normal((n, D)).astype(np.float32)
    return TemplateRecord(
        tenant=tenant,
        subject=subject,
        job_id=job_id,
        key_id="k1",
        key_version=1,
        bundle_id="test-bundle",
        bundle_hashes={"encoder": "0" * 64},
        algorithm={"steps": 3},
        embedding_dim=D,
        embedding=encode_embedding(embs.mean(0)),
        image_embeddings=encode_embedding(embs),
        source_images=[
            SourceImage(uri=f"s3://src/{i}.jpg", sha256=hashlib.sha256(bytes([i])).hexdigest(), size=1)
            for i in range(n)
        ],
    )


def _job() -> str:
    return uuid.uuid4().hex


# --- the server itself ---------------------------------------------------------------------------------------------
def test_seaweed_rejects_wrong_credentials(seaweed):
    import boto3
    from botocore.exceptions import ClientError

    bad = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint,
        aws_access_key_id=seaweed.access_key,
        aws_secret_access_key="wrong",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError):
        bad.list_objects_v2(Bucket=seaweed.bucket)


@pytest.mark.parametrize("mode", ["if_none_match", "if_match"])
def test_conditional_put_race_exactly_one_wins(make_settings, s3_bucket, mode):
    """The property the commit relies on: N concurrent conditional writers, exactly one succeeds (5 rounds)."""
    store = _store(make_settings, s3_bucket)
    etag = store.put("race/p", b"start") if mode == "if_match" else None
    for rnd in range(5):
        key = f"race/{rnd}" if mode == "if_none_match" else "race/p"
        barrier, wins, losses = threading.Barrier(8), [], []

        def write(i, key=key, rnd=rnd, barrier=barrier, etag=etag, wins=wins, losses=losses) -> None:
            barrier.wait()
            try:
                body = f"{rnd}-{i}".encode()
                if mode == "if_none_match":
                    store.put(key, body, if_none_match=True)
                else:
                    store.put(key, body, if_match=etag)
                wins.append(i)
            except VersionConflictError:
                losses.append(i)

        ts = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(wins) == 1 and len(losses) == 7, (wins, losses)
        body, etag = store.get(key)
        assert body == f"{rnd}-{wins[0]}".encode()


def test_conditional_put_semantics(make_settings, s3_bucket):
    store = _store(make_settings, s3_bucket)
    e1 = store.put("c", b"1", if_none_match=True)
    with pytest.raises(VersionConflictError):
        store.put("c", b"2", if_none_match=True)
    e2 = store.put("c", b"3", if_match=e1)
    with pytest.raises(VersionConflictError):
        store.put("c", b"4", if_match=e1)  # stale
    with pytest.raises(VersionConflictError):
        store.put("missing", b"4", if_match=e2)
    assert store.get("c")[0] == b"3"


def test_error_mapping(make_settings, s3_bucket, seaweed):
    store = _store(make_settings, s3_bucket)
    with pytest.raises(ObjectNotFoundError):
        store.get("nope")
    assert store.head("nope") is None
    bad = _store(make_settings, s3_bucket, secret_access_key="wrong-" + "x" * 20)
    with pytest.raises(StorageError) as ei:
        bad.put("k", b"secret-bytes")
    assert "secret-bytes" not in str(ei.value) and "wrong-" not in str(ei.value)


# --- commits -------------------------------------------------------------------------------------------------------
def test_commit_read_and_idempotent_retry(make_settings, s3_bucket):
    ts = TemplateStore(_store(make_settings, s3_bucket))
    with pytest.raises(NoTemplateError):
        ts.current("t1", "alice")
    j1 = _job()
    imgs = [b"png-0", b"png-1"]
    c1 = ts.commit_version("t1", "alice", j1, template=_template("t1", "alice", j1), images=imgs)
    assert (c1.version, c1.created) == (1, True)
    cur = ts.current("t1", "alice")
    assert cur.version == 1 and cur.manifest.job_id == j1
    assert [ts.load_image(a) for a in cur.manifest.images] == imgs
    rec = ts.load_template(cur.manifest)
    assert rec.vector().shape == (D,)
    assert cur.image_uris[0].startswith(f"s3://{s3_bucket}/tenants/t1/subjects/alice/staging/{j1}/")

    again = ts.commit_version("t1", "alice", j1, template=_template("t1", "alice", j1, seed=1), images=[b"x"])
    assert (again.version, again.created) == (1, False)
    assert again.manifest == c1.manifest  # the first commit's artefacts, untouched
    assert ts.find_committed("t1", "alice", j1).version == 1

    j2 = _job()
    c2 = ts.commit_version("t1", "alice", j2, template=_template("t1", "alice", j2), images=imgs)
    assert (c2.version, c2.created) == (2, True)
    assert ts.current("t1", "alice").version == 2
    assert ts.list_versions("t1", "alice") == [1, 2]
    assert ts.commit_version("t1", "alice", j1, template=_template("t1", "alice", j1), images=imgs).version == 1
    assert ts.current("t1", "alice").version == 2  # a late retry never moves the pointer back
    assert list(ts.iter_subjects("t1")) == ["alice"]


def test_same_job_delivered_concurrently_makes_one_version(make_settings, s3_bucket):
    ts = TemplateStore(_store(make_settings, s3_bucket))
    job, results, errors = _job(), [], []
    barrier = threading.Barrier(6)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results.append(
                ts.commit_version(
                    "t", "bob", job, template=_template("t", "bob", job, seed=i), images=[f"img-{i}".encode()]
                )
            )
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ts.list_versions("t", "bob") == [1]
    assert {r.version for r in results} == {1}
    assert sum(r.created for r in results) == 1
    # the losers' staged artefacts were removed; only the winner's remain, and they match the manifest
    m = ts.current("t", "bob").manifest
    assert ts.load_image(m.images[0]).startswith(b"img-")
    staged = [o.key for o in ts.store.list(f"tenants/t/subjects/bob/staging/{job}/")]
    assert sorted(staged) == sorted([m.template.key, *[a.key for a in m.images]])


def test_concurrent_distinct_jobs_get_dense_monotonic_versions(make_settings, s3_bucket):
    ts = TemplateStore(_store(make_settings, s3_bucket))
    jobs = [_job() for _ in range(6)]
    out: dict[str, int] = {}
    barrier = threading.Barrier(len(jobs))

    def run(j: str) -> None:
        barrier.wait()
        out[j] = ts.commit_version("t", "carol", j, template=_template("t", "carol", j), images=[b"i"]).version

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out.values()) == list(range(1, 7))
    assert ts.list_versions("t", "carol") == list(range(1, 7))
    assert ts.current("t", "carol").version == 6
    for j, v in out.items():  # every job finds exactly its own version again
        assert ts.find_committed("t", "carol", j).version == v


def test_crash_between_manifest_and_pointer_rolls_forward(make_settings, s3_bucket, monkeypatch):
    ts = TemplateStore(_store(make_settings, s3_bucket))
    j1 = _job()
    ts.commit_version("t", "dan", j1, template=_template("t", "dan", j1), images=[b"a"])
    j2 = _job()

    def crash(*a, **k):
        raise RuntimeError("worker died")

    monkeypatch.setattr(ts, "_advance_pointer", crash)
    with pytest.raises(RuntimeError):
        ts.commit_version("t", "dan", j2, template=_template("t", "dan", j2), images=[b"b"])
    monkeypatch.undo()
    assert ts.current("t", "dan").version == 1  # readers still see the old version
    assert ts.list_versions("t", "dan") == [1, 2]
    redo = ts.commit_version("t", "dan", j2, template=_template("t", "dan", j2), images=[b"c"])
    assert (redo.version, redo.created) == (2, False)
    assert ts.current("t", "dan").version == 2


def test_crash_after_artefacts_before_manifest_commits_once_on_retry(make_settings, s3_bucket, monkeypatch):
    store = _store(make_settings, s3_bucket)
    ts = TemplateStore(store)
    j = _job()
    real_put_json = store.put_json

    def fail_manifest(key, obj, **kw):
        if "/versions/" in key:
            raise StorageError("connection reset")
        return real_put_json(key, obj, **kw)

    monkeypatch.setattr(store, "put_json", fail_manifest)
    with pytest.raises(StorageError):
        ts.commit_version("t", "erin", j, template=_template("t", "erin", j), images=[b"a"])
    monkeypatch.undo()
    with pytest.raises(NoTemplateError):
        ts.current("t", "erin")
    c = ts.commit_version("t", "erin", j, template=_template("t", "erin", j), images=[b"a"])
    assert (c.version, c.created) == (1, True)
    assert ts.list_versions("t", "erin") == [1]


def test_stale_hint_still_finds_the_committed_version(make_settings, s3_bucket):
    """A lagging duplicate overwrote the job hint with a lower slot: the job is still found (no second version)."""
    store = _store(make_settings, s3_bucket)
    ts = TemplateStore(store)
    other, mine = _job(), _job()
    ts.commit_version("t", "fay", other, template=_template("t", "fay", other), images=[b"o"])
    ts.commit_version("t", "fay", mine, template=_template("t", "fay", mine), images=[b"m"])
    from worker.storage.records import JobHint

    store.put_json(layout.job_hint_key("t", "fay", mine), JobHint(job_id=mine, version=1))
    again = ts.commit_version("t", "fay", mine, template=_template("t", "fay", mine), images=[b"m"])
    assert (again.version, again.created) == (2, False)
    assert ts.list_versions("t", "fay") == [1, 2]


def test_readers_never_see_half_written_versions(make_settings, s3_bucket):
    ts = TemplateStore(_store(make_settings, s3_bucket))
    stop, seen, problems = threading.Event(), set(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                cur = ts.current("t", "gus")
            except NoTemplateError:
                continue
            try:
                ts.load_template(cur.manifest)  # hash-checked
                for a in cur.manifest.images:
                    ts.load_image(a)
                seen.add(cur.version)
            except Exception as e:
                problems.append(repr(e))

    r = threading.Thread(target=reader)
    r.start()
    try:
        for i in range(6):
            j = _job()
            ts.commit_version(
                "t", "gus", j, template=_template("t", "gus", j, n=3), images=[bytes([i]) * 5000 for _ in range(3)]
            )
    finally:
        stop.set()
        r.join()
    assert not problems
    assert seen and max(seen) <= 6


# --- SSE pass-through ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sse", "kms_key"), [("AES256", None), ("aws:kms", "alias/templates")])
def test_sse_parameters_sent_on_every_put(make_settings, moto_kms, sse, kms_key):
    """Every PutObject of a commit carries the SSE settings (checked on the wire with a botocore hook, and in
    moto's S3, which records them; SeaweedFS would not tell us)."""
    st = make_settings(
        bucket="sse-bucket",
        s3={
            "endpoint_url": moto_kms,
            "access_key_id": "testing",
            "secret_access_key": "testing",
            "sse": sse,
            "sse_kms_key_id": kms_key,
        },
    )
    client = make_s3_client(st.s3)
    sent: list[dict] = []
    client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: sent.append(dict(params)))
    store = ObjectStore.from_settings(st.s3, client=client)
    store.ensure_bucket()
    ts = TemplateStore(store)
    j = _job()
    c = ts.commit_version("t", "hal", j, template=_template("t", "hal", j), images=[b"a", b"b"])
    assert len(sent) >= 6  # 2 images, template, hint, manifest, pointer
    for p in sent:
        assert p.get("ServerSideEncryption") == sse, p["Key"]
        assert p.get("SSEKMSKeyId") == kms_key
    head = client.head_object(Bucket="sse-bucket", Key=c.manifest.images[0].key)
    assert head.get("ServerSideEncryption") == sse


def test_sse_aes256_accepted_by_seaweed(make_settings, s3_bucket):
    store = _store(make_settings, s3_bucket, sse="AES256")
    ts = TemplateStore(store)
    j = _job()
    c = ts.commit_version("t", "ida", j, template=_template("t", "ida", j), images=[b"a"])
    assert ts.load_image(c.manifest.images[0]) == b"a"


# --- revocation, dead letters, bundles -----------------------------------------------------------------------------
def test_revocation_records_are_write_once_and_purge_needs_them(make_settings, s3_bucket):
    ts = TemplateStore(_store(make_settings, s3_bucket))
    j1, j2 = _job(), _job()
    ts.commit_version("t", "jo", j1, template=_template("t", "jo", j1), images=[b"a", b"b"])
    ts.commit_version("t", "jo", j2, template=_template("t", "jo", j2), images=[b"c"])
    with pytest.raises(VersionConflictError):
        ts.purge_images("t", "jo", 1)
    rj = _job()
    r1 = ts.mark_revoked("t", "jo", 1, reason="leak", job_id=rj, replaced_by=2)
    r2 = ts.mark_revoked("t", "jo", 1, reason="other", job_id=_job())
    assert r2.reason == "leak" and r2.job_id == rj and r1.replaced_by == 2
    assert ts.is_revoked("t", "jo", 1) and not ts.is_revoked("t", "jo", 2)
    assert ts.purge_images("t", "jo", 1) == 2
    m1 = ts.get_manifest("t", "jo", 1)
    with pytest.raises(ObjectNotFoundError):
        ts.load_image(m1.images[0])
    assert ts.revocation("t", "jo", 1).images_purged
    ts.load_template(m1)  # the audit record stays


def test_dead_letters_roundtrip(make_settings, s3_bucket):
    from worker.storage import iter_dead_letters

    store = _store(make_settings, s3_bucket)
    j = _job()
    uri = write_dead_letter(
        store,
        DeadLetter(job_id=j, job_kind="enroll", tenant="t", attempts=3, error_code="internal_error", job={"job_id": j}),
    )
    assert uri == f"s3://{s3_bucket}/tenants/t/dead-letters/{j}.json"
    assert read_dead_letter(store, "t", j).attempts == 3
    assert read_dead_letter(store, "t", _job()) is None
    assert list(iter_dead_letters(store, "t")) == [j]


def test_bundle_sync_is_cached_and_atomic(make_settings, s3_bucket, tmp_path: Path):
    store = _store(make_settings, s3_bucket)
    store.put("bundles/b1/manifest.json", b'{"id": "b1"}')
    store.put("bundles/b1/weights/enc.pt", b"\x00" * 1000)
    uri = f"s3://{s3_bucket}/bundles/b1/"
    d = sync_bundle(uri, tmp_path / "cache", store)
    assert (d / "manifest.json").read_bytes() == b'{"id": "b1"}'
    assert (d / "weights" / "enc.pt").stat().st_size == 1000
    mtime = (d / "manifest.json").stat().st_mtime_ns
    assert sync_bundle(uri, tmp_path / "cache", store) == d
    assert (d / "manifest.json").stat().st_mtime_ns == mtime  # reused, not downloaded again
    store.put("bundles/b1/manifest.json", b'{"id": "b1", "v": 2}')
    d2 = sync_bundle(uri, tmp_path / "cache", store)
    assert d2 == d and (d / "manifest.json").read_bytes() == b'{"id": "b1", "v": 2}'
    assert [p.name for p in d.parent.iterdir() if p.name.startswith(".")] == []
    from worker.errors import BundleError

    with pytest.raises(BundleError):
        sync_bundle(f"s3://{s3_bucket}/bundles/none/", tmp_path / "cache", store)


def test_sweep_staging_removes_only_unreferenced_old_objects(make_settings, s3_bucket, monkeypatch):
    store = _store(make_settings, s3_bucket)
    ts = TemplateStore(store)
    j = _job()
    real_put_json = store.put_json

    def fail_manifest(key, obj, **kw):
        if "/versions/" in key:
            raise StorageError("connection reset")
        return real_put_json(key, obj, **kw)

    monkeypatch.setattr(store, "put_json", fail_manifest)
    with pytest.raises(StorageError):  # leaves 1 image + 1 template orphaned in staging
        ts.commit_version("t", "kim", j, template=_template("t", "kim", j), images=[b"orphan"])
    monkeypatch.undo()
    c = ts.commit_version("t", "kim", j, template=_template("t", "kim", j), images=[b"kept"])
    staged = [o.key for o in store.list("tenants/t/subjects/kim/staging/")]
    assert len(staged) == 4
    assert ts.sweep_staging("t", "kim", older_than_s=3600) == 0  # too young
    import datetime as dt

    import worker.storage.templates as tmod

    monkeypatch.setattr(tmod, "utcnow", lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    assert ts.sweep_staging("t", "kim", older_than_s=3600) == 2
    left = sorted(o.key for o in store.list("tenants/t/subjects/kim/staging/"))
    assert left == sorted([c.manifest.template.key, *[a.key for a in c.manifest.images]])
    assert ts.load_image(ts.current("t", "kim").manifest.images[0]) == b"kept"


def test_sweep_all_staging_walks_every_subject_with_a_staging_area(make_settings, s3_bucket, monkeypatch):
    store = _store(make_settings, s3_bucket)
    ts = TemplateStore(store)
    for tenant, subject in (("t1", "ann"), ("t1", "bob"), ("t2", "cy")):
        j = _job()
        store.put(layout.image_key(layout.staging_prefix(tenant, subject, j, "1"), 0), b"orphan")
        if subject != "bob":  # bob also has a committed version whose artefacts must stay
            ts.commit_version(tenant, subject, j, template=_template(tenant, subject, j), images=[b"kept"])
    store.put_json(layout.subject_key_state("t2", "dee"), {"v": 1})  # dee has no staging area: not visited
    assert ts.sweep_all_staging(older_than_s=3600) == (3, 0)  # everything is too young
    import datetime as dt

    import worker.storage.templates as tmod

    monkeypatch.setattr(tmod, "utcnow", lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    assert ts.sweep_all_staging(older_than_s=3600, tenant="t2") == (1, 1)
    assert ts.sweep_all_staging(older_than_s=3600) == (3, 2)
    for tenant, subject in (("t1", "ann"), ("t2", "cy")):
        m = ts.current(tenant, subject).manifest
        assert ts.load_image(m.images[0]) == b"kept"
        left = sorted(o.key for o in store.list(layout.subject_prefix(tenant, subject) + "staging/"))
        assert left == sorted([m.template.key, *[a.key for a in m.images]])
    assert list(store.list("tenants/t1/subjects/bob/staging/")) == []
