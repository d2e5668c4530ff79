"""The fakes behave like what they stand for where the service relies on it: S3's conditional writes (exactly one of
racing writers wins), ranged reads, delimiter listings resumed after a name, pages; the job book's scripts."""

from __future__ import annotations

import threading

import pytest
from service_fakes import FakeRedis, FakeS3

from worker.errors import ObjectNotFoundError, VersionConflictError
from worker.storage.client import ObjectStore
from worker.storage.jobbook import JobBook


@pytest.fixture
def store() -> ObjectStore:
    s3 = FakeS3(page_size=2)  # small pages: listings cross page boundaries
    s3.create_bucket(Bucket="b")
    return ObjectStore(s3, "b")


def test_conditional_put_semantics(store: ObjectStore) -> None:
    e1 = store.put("c", b"1", if_none_match=True)
    with pytest.raises(VersionConflictError):
        store.put("c", b"2", if_none_match=True)
    e2 = store.put("c", b"3", if_match=e1)
    with pytest.raises(VersionConflictError):
        store.put("c", b"4", if_match=e1)  # stale
    with pytest.raises(VersionConflictError):
        store.put("missing", b"4", if_match=e2)
    assert store.get("c")[0] == b"3"
    with pytest.raises(ObjectNotFoundError):
        store.get("nope")
    assert store.head("nope") is None


def test_racing_conditional_writers_exactly_one_wins(store: ObjectStore) -> None:
    barrier, wins, losses = threading.Barrier(8), [], []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.put("race", str(i).encode(), if_none_match=True)
            wins.append(i)
        except VersionConflictError:
            losses.append(i)

    ts = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert store.get("race")[0] == str(wins[0]).encode()


def test_listings_ranges_and_dirs(store: ObjectStore) -> None:
    for k in ("t/a/1", "t/a/2", "t/b/1", "t/c/1", "t/c/2", "t/d", "u/x"):
        store.put(k, k.encode())
    assert [o.key for o in store.list("t/")] == ["t/a/1", "t/a/2", "t/b/1", "t/c/1", "t/c/2", "t/d"]
    assert [o.key for o in store.list("t/", start_after="t/b/1")] == ["t/c/1", "t/c/2", "t/d"]
    assert list(store.list_dirs("t/")) == ["a", "b", "c"]
    assert list(store.list_dirs("t/", start_after="a")) == ["b", "c"]
    body = store.client.get_object(Bucket="b", Key="t/a/1", Range="bytes=2-")["Body"].read()
    assert body == b"a/1"


def test_job_book_scripts_on_the_fake_redis() -> None:
    book = JobBook(FakeRedis())
    assert book.claim_subjects("t/j", [("ann", 2), ("bob", 3), ("ann", 7)]) == [2, 3, 2]
    assert book.advance_bulk("t/j", 5, (5, 100, 6, 14)) == 5
    assert book.advance_bulk("t/j", 3, (3, 60, 4, 14)) == 5  # never moves back
    f = book.get_fields("t/j")
    assert (f["cursor"], f["resume_index"], f["resume_offset"], f["resume_lines"]) == ("5", "5", "100", "6")
    book.set_cursor("t/j", 9)
    book.set_cursor("t/j", 1)
    assert book.get_cursor("t/j") == 9
    book.open_job("t/j", "bulk", tenant="t")
    book.set_total("t/j", 2)
    book.mark_succeeded("t/j", ["a"])
    book.mark_failed("t/j", {"a": "x", "b": "no_face"})  # a stays succeeded
    p = book.progress("t/j")
    assert (p.total, p.succeeded, p.failed, p.failed_codes) == (2, 1, 1, {"no_face": 1})
    assert book.claim_finaliser("t/j") and not book.claim_finaliser("t/j")
