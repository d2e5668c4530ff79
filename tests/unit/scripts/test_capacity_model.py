"""The capacity model in scripts/capacity.py: each regime gives the time its mechanism implies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "scripts" / "capacity.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_small_fleet_bulk_is_engine_bound(cap: ModuleType) -> None:
    fleet = cap.Fleet(workers=2, images_per_s=5.0)
    p = cap.predict(fleet, cap.Job(20_000, photos=2, kind="bulk"))
    engine = 20_000 * 2 / (2 * 5.0)
    assert p.bottleneck == "engine"
    assert engine <= p.seconds <= engine * 1.01


def test_bulk_queue_depth_follows_the_pause(cap: ModuleType) -> None:
    """A continuation looks at the queue before it sends: however slow the fleet, the queue never holds more than
    the window plus the chunk sent just before the pause, and a slower fleet only pauses more often."""
    window = cap.BULK_MAX_QUEUE_DEPTH_CHUNKS * 64
    per_pause = 64 / cap.BULK_PAUSE_S
    fast = cap.predict(cap.Fleet(workers=1, images_per_s=2 * per_pause, concurrency=0), cap.Job(20_000))
    slow = cap.predict(cap.Fleet(workers=1, images_per_s=per_pause / 2, concurrency=0), cap.Job(20_000))
    for p in (fast, slow):
        assert window < p.max_queue_messages <= window + 64
    assert slow.pauses > fast.pauses


def test_bulk_fanout_caps_a_large_fleet(cap: ModuleType) -> None:
    """Once the fleet drains the window faster than the pause, more workers stop helping."""
    job = cap.Job(200_000, photos=1, kind="bulk")
    t10 = cap.predict(cap.Fleet(workers=10, images_per_s=200.0), job)
    t100 = cap.predict(cap.Fleet(workers=100, images_per_s=200.0), job)
    assert t100.pauses > 0 and t100.bottleneck.startswith("fan-out")
    engine = 200_000 / (100 * 200.0)
    assert t100.seconds > 5 * engine
    # one pause per cycle; a cycle refills the window, the chunk past it and what the workers hold, while the
    # engines go on draining at their rate
    f = cap.Fleet(workers=100, images_per_s=200.0)
    rate = f.workers * min(f.images_per_s, f.prep_parallel / (f.enrol_prep_s + f.enrol_commit_s))
    buffer = cap.BULK_MAX_QUEUE_DEPTH_CHUNKS * f.bulk_chunk + f.bulk_chunk + f.workers * f.concurrency
    refill = buffer / (f.stream_rows_per_s - rate)
    per_cycle = buffer + rate * refill
    assert t100.seconds >= 200_000 / per_cycle * (cap.BULK_PAUSE_S + refill) * 0.9
    assert t10.seconds > t100.seconds


def test_revoke_is_capped_by_the_chunk_window(cap: ModuleType) -> None:
    job = cap.Job(50_000, photos=1, kind="revoke")
    p10 = cap.predict(cap.Fleet(workers=10, images_per_s=100.0), job)
    p100 = cap.predict(cap.Fleet(workers=100, images_per_s=100.0), job)
    assert p100.seconds == pytest.approx(p10.seconds, rel=0.01)
    assert p100.max_queue_messages <= cap.REVOKE_MAX_QUEUED_CHUNKS + 1
    assert p100.bottleneck.startswith("re-enrolment chunks")


def test_one_revoke_chunk_is_serial_prep_engine_commit(cap: ModuleType) -> None:
    f = cap.Fleet(workers=1, images_per_s=2.0, prep_s_per_subject=0.3, commit_s_per_subject=0.2)
    p = cap.predict(f, cap.Job(40, photos=2, kind="revoke"))
    listing = 40 / f.list_subjects_per_s
    assert p.seconds == pytest.approx(f.continuation_s + listing + 40 * 0.3 + 40 * 2 / 2.0 + 40 * 0.2)


def test_s3_requests_scale_with_subjects_and_photos(cap: ModuleType) -> None:
    f = cap.Fleet()
    one = cap.predict(f, cap.Job(1000, photos=1, kind="bulk")).s3_requests
    two = cap.predict(f, cap.Job(1000, photos=2, kind="bulk")).s3_requests
    for op, (fixed, per) in cap.ENROLL_S3.items():
        assert one[op] == 1000 * (fixed + per)
        assert two[op] - one[op] == 1000 * per
