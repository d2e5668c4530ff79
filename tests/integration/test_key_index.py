"""The per-(tenant, key) subject index (``worker/storage/keyindex.py``) against a real SeaweedFS: the markers the
key registry and the commit write, the index listing giving exactly the record scan's answer (reading only the
subjects the index leaves undecided), crash windows, the cursor, the backfill, and a key revocation listing through
the index across hand-overs."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

from worker.keys.registry import KeyRegistry
from worker.storage import ObjectStore, TemplateStore, layout
from worker.storage.keyindex import COMMITTED_UNDER, UNCOMMITTED_UNDER, KeyIndex, backfill_key_index, subjects_under_key
from worker.storage.records import CurrentPointer, SourceImage, SubjectKeyRecord, TemplateRecord, encode_embedding

T = "acme"


@pytest.fixture
def store(make_settings, s3_bucket: str) -> ObjectStore:
    return ObjectStore.from_settings(make_settings(bucket=s3_bucket).s3)


def _job(tag: str = "j") -> str:
    return f"{tag}-{uuid.uuid4().hex}"


def _commit(store: ObjectStore, subject: str, rec: SubjectKeyRecord) -> None:
    """A real commit (artefacts, manifest, pointer move) of a version made under ``rec``'s key."""
    job = _job("enr")
    emb = np.ones(4, dtype=np.float32)
    tpl = TemplateRecord(
        tenant=T,
        subject=subject,
        job_id=job,
        key_id=rec.key_id,
        key_version=rec.key_version,
        bundle_id="b",
        embedding_dim=4,
        embedding=encode_embedding(emb),
        source_images=[SourceImage(uri="s3://in/x.jpg", sha256=hashlib.sha256(b"x").hexdigest(), size=1)],
    )
    TemplateStore(store).commit_version(T, subject, job, template=tpl, images=[b"img"], key_epoch=rec.epoch)


def _enrol(store: ObjectStore, subject: str, key_id: str, commit: bool = True) -> SubjectKeyRecord:
    rec = KeyRegistry(store).ensure_subject_key(T, subject, key_id)
    if commit:
        _commit(store, subject, rec)
    return rec


def _markers(store: ObjectStore, key_id: str) -> list[str]:
    prefix = layout.key_index_prefix(T, key_id)
    return [o.key[len(prefix) :] for o in store.list(prefix)]


def _hits(
    store: ObjectStore, key_id: str, job_id: str | None, use_index: bool, standing: str = COMMITTED_UNDER
) -> list[str]:
    """The subjects listed under ``key_id`` with ``standing`` (default: with a committed version, to reissue)."""
    listed = subjects_under_key(store, T, key_id, job_id, use_index=use_index, threads=4)
    return [s for s, st in listed if st == standing]


class _CountingStore(ObjectStore):
    """Records which subjects' records were read."""

    def __init__(self, inner: ObjectStore) -> None:
        super().__init__(inner.client, inner.bucket, prefix=inner.prefix, sse=inner.sse)
        self.read: set[str] = set()

    def get(self, key: str) -> tuple[bytes, str]:
        self._note(key)
        return super().get(key)

    def head(self, key: str):
        self._note(key)
        return super().head(key)

    def _note(self, key: str) -> None:
        if "/subjects/" in key and "/keys/" not in key:
            self.read.add(key.split("/subjects/", 1)[1].split("/", 1)[0])


def test_registry_and_commit_write_the_markers(store: ObjectStore) -> None:
    reg = KeyRegistry(store)
    rec = _enrol(store, "ann", "k1", commit=False)
    assert _markers(store, "k1") == ["ann~p"]  # before the record exists
    _commit(store, "ann", rec)
    assert _markers(store, "k1") == ["ann~c", "ann~p"]
    reg.bump_subject_key(T, "ann", reason="r", job_id="rev-00000001")  # same key: nothing moves
    assert _markers(store, "k1") == ["ann~c", "ann~p"] and _markers(store, "k2") == []
    reg.bump_subject_key(T, "ann", reason="r", job_id="rev-00000002", new_key_id="k2")
    assert _markers(store, "k1") == ["ann~c", "ann~d.rev-00000002", "ann~p"]
    assert _markers(store, "k2") == ["ann~p"]
    reg.ensure_subject_key(T, "ann", "k2")  # already there: no write
    assert _markers(store, "k2") == ["ann~p"]


def test_index_listing_gives_the_record_scan_answer_reading_only_undecided_subjects(store: ObjectStore) -> None:
    reg = KeyRegistry(store)
    plain = [f"s{i}" for i in range(5)]
    for s in plain:
        _enrol(store, s, "k1")
    _enrol(store, "uncommitted", "k1", commit=False)
    _enrol(store, "other-key", "k9")
    # moved off k1 by another revocation, reissued under k2
    _enrol(store, "moved", "k1")
    _commit(store, "moved", reg.bump_subject_key(T, "moved", reason="r", job_id="rev-other01", new_key_id="k2"))
    # moved off k1 by THIS revocation (its own re-delivered listing still counts it)
    this = "rev-this0001"
    _enrol(store, "mine", "k1")
    reg.bump_subject_key(T, "mine", reason="r", job_id=this, new_key_id="k2")
    # crash windows: a pending marker whose record write never happened; a commit whose c marker was lost
    KeyIndex(store).pending(T, "k1", "never-written")
    _enrol(store, "lost-c", "k1")
    store.delete(layout.key_index_marker(T, "k1", "lost-c", "c"))
    # a departure announced but not done (crash before the record moved): still under k1
    _enrol(store, "half-moved", "k1")
    KeyIndex(store).departing(T, "k1", "half-moved", "rev-crashed1")

    expected = sorted([*plain, "mine", "lost-c", "half-moved"])
    counting = _CountingStore(store)
    assert sorted(_hits(counting, "k1", this, use_index=True)) == expected
    assert counting.read == {"uncommitted", "moved", "never-written", "lost-c", "half-moved"}
    assert sorted(_hits(store, "k1", this, use_index=False)) == expected  # the records say the same
    # under the key with no committed version yet (a first enrolment maybe in flight): listed to be fenced
    for use_index in (True, False):
        assert _hits(store, "k1", this, use_index, UNCOMMITTED_UNDER) == ["uncommitted"]
    # another job: the subject "mine" was moved by someone else, so it is not under k1 any more
    assert sorted(_hits(store, "k1", "rev-later001", use_index=True)) == sorted(set(expected) - {"mine"})
    assert sorted(_hits(store, "k1", "rev-later001", use_index=False)) == sorted(set(expected) - {"mine"})
    assert sorted(_hits(store, "k2", None, use_index=True)) == ["mine", "moved"]
    assert sorted(_hits(store, "k2", None, use_index=False)) == ["mine", "moved"]


def test_a_fence_only_pointer_refuses_a_first_commit_derived_before_it(store: ObjectStore) -> None:
    """What a key revocation does to a subject under the key with no committed version: key record moved to the new
    key, a fence-only pointer at the new epoch. The in-flight first commit (old epoch) is refused and nothing is
    current; a commit under the new key becomes version 1's successor; a commit that won the race is fenced as
    usual (its pointer keeps its version, the epoch is raised)."""
    from worker.errors import NoTemplateError, StaleKeyError
    from worker.storage.keyindex import has_version
    from worker.storage.subjects import read_subject

    reg, ts = KeyRegistry(store), TemplateStore(store)
    inflight = _enrol(store, "first", "k1", commit=False)
    moved = reg.bump_subject_key(T, "first", reason="r", job_id="rev-fence001", new_key_id="k2")
    fence = ts.raise_fence(T, "first", moved.epoch, fence_job="rev-fence001")
    assert fence is not None and fence.version is None and fence.key_epoch == 2 and fence.job_id == "rev-fence001"
    assert ts.raise_fence(T, "first", moved.epoch, fence_job="rev-fence001") == fence  # idempotent
    with pytest.raises(StaleKeyError):
        _commit(store, "first", inflight)
    with pytest.raises(NoTemplateError):
        ts.current(T, "first")
    assert not has_version(store, T, "first")
    state = read_subject(store, T, "first")
    assert state is not None and state.current_version is None and state.key_id == "k2"
    _commit(store, "first", moved)
    cur = ts.current(T, "first")
    assert (cur.manifest.key_id, cur.manifest.key_epoch, cur.fence_epoch) == ("k2", 2, 2)
    assert _markers(store, "k2") == ["first~c", "first~p"]
    # the first commit won: the fence raises its pointer's epoch and reports the version (to be reissued)
    won = _enrol(store, "won", "k1")
    p = ts.raise_fence(T, "won", won.epoch + 1, fence_job="rev-fence001")
    assert p is not None and p.version == 1 and p.key_epoch == 2


def test_index_cursor_resumes_after_a_subject(store: ObjectStore) -> None:
    names = ["a", "a.b", "a-1", "a0", "a_", "b", "ab", "Z"]  # '~' sorts after each of [A-Za-z0-9._-]
    for s in names:
        _enrol(store, s, "k1")
    full = [s for s, _ in subjects_under_key(store, T, "k1", None, use_index=True)]
    assert sorted(full) == sorted(names)
    for i, cursor in enumerate(full):
        rest = [s for s, _ in subjects_under_key(store, T, "k1", None, cursor, use_index=True)]
        assert rest == full[i + 1 :], cursor


def test_backfill_indexes_subjects_enrolled_before_the_index(store: ObjectStore) -> None:
    for s, key, committed in [("old1", "k1", True), ("old2", "k1", True), ("old3", "k1", False), ("x", "k9", True)]:
        rec = SubjectKeyRecord(tenant=T, subject=s, key_id=key, key_version=1)
        store.put_json(layout.subject_key_state(T, s), rec)  # what the code before the index wrote: no markers
        if committed:
            store.put_json(layout.current_key(T, s), CurrentPointer(version=1, manifest_key="m", job_id="j0000001"))
    index = KeyIndex(store)
    assert not index.is_complete(T, "k1")
    assert _hits(store, "k1", None, use_index=True) == []  # why an incomplete index is never used
    assert backfill_key_index(store, T, "k1", threads=4) == 3
    assert index.is_complete(T, "k1") and not index.is_complete(T, "k9")
    counting = _CountingStore(store)
    assert sorted(_hits(counting, "k1", None, use_index=True)) == ["old1", "old2"]
    assert counting.read == {"old3"}
    # the whole tenant at once: every key, including one no subject uses yet, is complete from then on
    assert backfill_key_index(store, T, threads=4) == 4
    assert index.is_complete(T, "k9") and index.is_complete(T, "k-unused")
    assert _hits(store, "k9", None, use_index=True) == ["x"]
    assert not KeyIndex(store).is_complete("other", "k1")


def test_key_revocation_lists_through_a_complete_index_across_hand_overs(rt, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.contracts import job_from_wire
    from worker.keys.providers import write_keyring
    from worker.service import revoke as revoke_service
    from worker.service.clock import now
    from worker.tasks import control_tasks

    class Task:
        def __init__(self) -> None:
            self.continued: list[dict] = []

        def apply_async(self, **kw: object) -> None:
            self.continued.append(kw)

    write_keyring(rt.settings.keys.keyring_path, ["k1", "k2"])
    under = [f"s{i:02d}" for i in range(7)]
    for s in under:
        _enrol(rt.store, s, "k1")
    _enrol(rt.store, "other-key", "k9")
    _enrol(rt.store, "never-committed", "k1", commit=False)

    def revoke(tag: str) -> tuple[list[list[str]], int, dict[str, str]]:
        job = job_from_wire(
            {"kind": "revoke", "job_id": _job(tag), "tenant": T, "key_id": "k1", "new_key_id": "k2", "reason": "r"}
        )
        sent: list[dict] = []
        monkeypatch.setattr(control_tasks.app, "send_task", lambda name, **kw: sent.append(kw["args"][0]))
        task = Task()
        c = 0
        while True:
            dispatch = control_tasks.CeleryDispatch(task, job.job_id, rt.redis)
            revoke_service.revoke(rt, job, 1, now(), dispatch, c)
            if len(task.continued) == c:
                break
            c += 1
        return [p["subjects"] for p in sent], len(task.continued), rt.book.get_fields(job.ref)

    monkeypatch.setattr(rt.settings.worker, "revoke_chunk_size", 3)
    monkeypatch.setattr(rt.settings.worker, "fanout_time_budget", 0.0)  # hand over after every chunk
    chunks, handovers, fields = revoke("scan")  # no index.json: every subject's records are read, as before
    assert fields["listing_mode"] == "scan" and chunks == [under[:3], under[3:6], under[6:]] and handovers == 2
    # the subject with no committed version: not reissued, moved to k2 and fenced (a fence-only pointer)
    assert fields["subjects_fenced"] == "1"
    assert KeyRegistry(rt.store).subject_key(T, "never-committed").key_id == "k2"  # type: ignore[union-attr]
    fence = TemplateStore(rt.store).read_pointer(T, "never-committed")
    assert fence is not None and fence[0].version is None and fence[0].key_epoch == 2
    KeyIndex(rt.store).mark_complete(T, "k1")
    chunks, handovers, fields = revoke("idx")
    assert fields["listing_mode"] == "index" and chunks == [under[:3], under[3:6], under[6:]] and handovers == 2
    assert fields["listing"] == "done" and fields["total"] == "7"
    assert fields["subjects_fenced"] == "0"  # already moved off k1 by the first revocation


@pytest.fixture
def rt(make_settings, redis_url: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch):
    from worker.tasks import runtime

    url = redis_url.rsplit("/", 1)[0] + "/5"  # its own database: the revocations it leaves open stay out of others'
    r = runtime.Runtime(make_settings(bucket=s3_bucket, redis={"url": url}))
    monkeypatch.setattr(runtime, "_runtime", r)
    yield r
    r.redis.flushdb()
