"""The engine micro-batcher (``worker.tasks.batcher``) with a fake engine function: when a batch starts (cap, fill
timeout, mate wait, nothing more coming), lanes, per-member failure isolation, result order; the in-flight tracking
(``worker.tasks.inflight``), the watchdog (``worker.tasks.watchdog``) and the engine call it runs
(``worker.service.engine.EngineCall``: packing and metering)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from worker.broker.config import ENGINE_BULK_QUEUE, ENGINE_QUEUES, LEGACY_ENGINE_QUEUE
from worker.tasks import inflight
from worker.tasks.batcher import Coming, MicroBatcher
from worker.tasks.inflight import InFlight, current_delivery, delivery_attempt
from worker.tasks.watchdog import Watchdog

NOTHING = Coming({})


class FakeEngine:
    """``run_batch(lane, items)``: an item is ``(images, tag)`` (``images`` a list: its length is the image count);
    the result of an item is ``(lane, tag)``. Raises for any batch holding a tag in ``bad``."""

    def __init__(self, bad: frozenset[str] = frozenset(), gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.bad = bad
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, lane: str, items: list[Any]) -> list[Any]:
        if self.gate is not None:
            self.gate.wait(10)
        tags = [tag for _, tag in items]
        with self.lock:
            self.calls.append((lane, tags))
        if self.bad & set(tags):
            raise ValueError("poison image")
        return [(lane, tag) for tag in tags]

    def batches(self) -> list[list[str]]:
        with self.lock:
            return [tags for _, tags in self.calls]


def item(tag: str, n: int = 1) -> tuple[list[int], str]:
    return [0] * n, tag


class Submitter(threading.Thread):
    def __init__(
        self, b: MicroBatcher, lane: str, items: list[Any], alone: bool = False, background: bool = False
    ) -> None:
        super().__init__(daemon=True)
        self.b, self.lane, self.items, self.alone, self.background = b, lane, items, alone, background
        self.result: list[Any] | None = None
        self.error: BaseException | None = None
        self.elapsed = 0.0

    def run(self) -> None:
        t = time.monotonic()
        try:
            self.result = self.b.submit(self.lane, self.items, alone=self.alone, background=self.background)
        except BaseException as e:
            self.error = e
        self.elapsed = time.monotonic() - t


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def pending(b: MicroBatcher) -> int:
    with b._cond:
        return len(b._pending)


def submit_in_order(
    b: MicroBatcher,
    specs: list[tuple[str, list[Any]]],
    alone: set[int] | None = None,
    coming: dict[str, Coming] | None = None,
) -> list:
    """Start one submitter per spec, each after the previous one is queued (or already taken by the engine). With
    ``coming`` (what the batcher's ``expected`` reads), the specs not yet submitted are announced as preparing."""
    threads = []
    for i, (lane, items) in enumerate(specs):
        if coming is not None:  # as the worker counts them: a task is preparing until it has submitted
            coming["now"] = Coming(dict(Counter(spec_lane for spec_lane, _ in specs[i:])))
        t = Submitter(b, lane, items, alone=i in (alone or set()))
        with b._cond:
            before = b._changes  # only this submission can change it meanwhile
        t.start()
        wait_until(lambda before=before: b._changes > before)
        if coming is not None:
            coming["now"] = Coming(dict(Counter(spec_lane for spec_lane, _ in specs[i + 1 :])))
            b.wakeup()
        threads.append(t)
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    return threads


def test_engine_packing_keeps_subjects_whole_and_in_order() -> None:
    from worker.algorithm.engine_base import pack_subjects

    def sizes(counts: list[int], limit: int) -> list[list[int]]:
        return [[len(f) for f, _ in c] for c in pack_subjects([([0] * n, b"") for n in counts], limit)]  # type: ignore[misc]

    assert sizes([3, 3, 3, 1], 8) == [[3, 3], [3, 1]]
    assert sizes([10, 1, 1], 8) == [[10], [1, 1]]  # a subject over the cap forms a batch of its own
    assert sizes([], 8) == []
    assert sizes([1] * 5, 1) == [[1]] * 5


def test_cap_whole_submissions_and_each_gets_its_own_results_in_order() -> None:
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=30.0, expected=lambda: NOTHING)
    # the engine is held on the first (lone) submission so the next ones queue up behind it
    first = Submitter(b, "enroll", [item("a0")])
    first.start()
    wait_until(lambda: b.running_since() is not None)
    specs = [("enroll", [item(f"s{i}-x", 3), item(f"s{i}-y", 0)]) for i in range(5)]
    threads = [Submitter(b, lane, items) for lane, items in specs]
    for i, t in enumerate(threads):
        t.start()
        wait_until(lambda i=i: pending(b) == i + 1)
    b._expected = lambda: Coming({"enroll": 1})  # one task still preparing: only the cap starts a batch now
    gate.set()
    wait_until(lambda: pending(b) == 1)
    time.sleep(0.1)
    assert pending(b) == 1  # the last one waits for batch mates ...
    b.close()  # ... until the batcher closes (or the fill timeout)
    for t in [first, *threads]:
        t.join(20)
        assert t.error is None and not t.is_alive()
    assert first.result == [("enroll", "a0")]
    for i, t in enumerate(threads):
        assert t.result == [("enroll", f"s{i}-x"), ("enroll", f"s{i}-y")]
    # 3 images each, cap 8: two submissions per batch, never a split submission
    assert eng.batches()[:3] == [["a0"], ["s0-x", "s0-y", "s1-x", "s1-y"], ["s2-x", "s2-y", "s3-x", "s3-y"]]
    assert eng.batches()[3:] == [["s4-x", "s4-y"]]


def test_fill_timeout_bounds_the_wait_and_gathers_what_arrives_meanwhile() -> None:
    eng = FakeEngine()
    # no in-flight count: only the cap or the timeout; 2 s leaves a loaded machine time to start the three threads
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=2.0)
    t0 = time.monotonic()
    threads = [Submitter(b, "enroll", [item(f"j{i}")]) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [t.result for t in threads] == [[("enroll", f"j{i}")] for i in range(3)]
    # one batch of all three (in the order the threads happened to submit)
    assert len(eng.batches()) == 1 and sorted(eng.batches()[0]) == ["j0", "j1", "j2"]
    assert time.monotonic() - t0 >= 2.0  # waited for batch mates up to the fill timeout
    assert max(t.elapsed for t in threads) >= 1.9  # the first submitter waited the whole fill timeout


def test_no_wait_once_nothing_more_can_come() -> None:
    eng = FakeEngine()
    coming = {"now": NOTHING}
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=30.0, mate_wait_s=30.0, expected=lambda: coming["now"])
    (t,) = submit_in_order(b, [("enroll", [item("lone")])])
    assert t.result == [("enroll", "lone")] and t.elapsed < 20  # a lone job does not wait for the 30 s bounds
    # a second task still preparing: the first submission waits for it, then both run together
    coming["now"] = Coming({"enroll": 1})
    p = Submitter(b, "enroll", [item("p")])
    p.start()
    wait_until(lambda: pending(b) == 1)
    time.sleep(0.1)
    assert p.is_alive()
    coming["now"] = NOTHING  # the second one hands its work over
    (q,) = submit_in_order(b, [("enroll", [item("q")])])
    p.join(20)
    assert (p.result, q.result) == ([("enroll", "p")], [("enroll", "q")])
    assert eng.batches() == [["lone"], ["p", "q"]]


def test_wakeup_starts_a_batch_when_a_task_stops_preparing() -> None:
    eng = FakeEngine()
    coming = {"now": Coming({"enroll": 1})}
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=30.0, mate_wait_s=30.0, expected=lambda: coming["now"])
    t = Submitter(b, "enroll", [item("only")])
    t.start()
    wait_until(lambda: pending(b) == 1)
    time.sleep(0.1)
    assert t.is_alive()  # waiting for the other task
    coming["now"] = NOTHING  # it finished without submitting (e.g. failed to decode its image)
    b.wakeup()
    t.join(20)
    assert t.result == [("enroll", "only")] and t.elapsed < 20


def test_mate_wait_bounds_the_wait_for_tasks_still_preparing_and_fill_timeout_for_the_broker() -> None:
    eng = FakeEngine()
    coming = {"now": Coming({"enroll": 1})}
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=0.05, mate_wait_s=30.0, expected=lambda: coming["now"])
    p = Submitter(b, "enroll", [item("p")])
    p.start()
    time.sleep(0.5)
    assert p.is_alive() and pending(b) == 1  # 10x the fill timeout: still waiting for the mate being prepared
    coming["now"] = NOTHING  # the mate hands its work over
    (q,) = submit_in_order(b, [("enroll", [item("q")])])
    p.join(20)
    assert eng.batches() == [["p", "q"]] and q.result == [("enroll", "q")]
    # only messages on the broker could come: the (short) fill timeout bounds the wait
    coming["now"] = Coming({}, queued=3)
    (r,) = submit_in_order(b, [("enroll", [item("r")])])
    assert r.result == [("enroll", "r")] and r.elapsed < 20 and eng.batches()[-1] == ["r"]
    # the mate wait is a bound too
    b.mate_wait_s = 0.3
    coming["now"] = Coming({"enroll": 1})
    (s,) = submit_in_order(b, [("enroll", [item("s")])])
    assert s.result == [("enroll", "s")] and 0.25 <= s.elapsed < 20


def test_a_lane_waiting_for_mates_does_not_hold_back_a_ready_lane() -> None:
    eng = FakeEngine()
    coming = {"now": Coming({"verify": 1, "enroll": 1})}
    b = MicroBatcher(eng, max_images=2, fill_timeout_s=30.0, mate_wait_s=30.0, expected=lambda: coming["now"])
    v = Submitter(b, "verify", [item("v1")])
    v.start()
    wait_until(lambda: pending(b) == 1)
    es = submit_in_order(b, [("enroll", [item("e1")]), ("enroll", [item("e2")])])  # a full enrol batch behind it
    assert [e.result for e in es] == [[("enroll", "e1")], [("enroll", "e2")]] and eng.batches() == [["e1", "e2"]]
    assert v.is_alive()  # the older verify still waits for its mate
    coming["now"] = NOTHING
    b.wakeup()
    v.join(20)
    assert v.result == [("verify", "v1")] and eng.batches() == [["e1", "e2"], ["v1"]]


def test_interactive_work_runs_before_background_work_queued_earlier_and_fills_batches_first() -> None:
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    b = MicroBatcher(eng, max_images=2, fill_timeout_s=30.0, expected=lambda: NOTHING)
    first = Submitter(b, "enroll", [item("a0")])  # holds the engine while the rest queues up behind it
    first.start()
    wait_until(lambda: b.running_since() is not None)
    bulk = [Submitter(b, "enroll", [item(f"b{i}")], background=True) for i in range(4)]
    users = [Submitter(b, "verify", [item("v1")]), Submitter(b, "enroll", [item("e1")])]
    for i, t in enumerate([*bulk, *users]):  # every background submission is older than the interactive ones
        t.start()
        wait_until(lambda i=i: pending(b) == i + 1)
    gate.set()
    for t in [first, *bulk, *users]:
        t.join(20)
        assert t.error is None and not t.is_alive()
    assert [t.result for t in users] == [[("verify", "v1")], [("enroll", "e1")]]
    assert [t.result for t in bulk] == [[("enroll", f"b{i}")] for i in range(4)]
    assert eng.batches() == [["a0"], ["v1"], ["e1", "b0"], ["b1", "b2"], ["b3"]]


def test_a_large_background_job_runs_in_packs_and_a_verify_runs_between_them() -> None:
    """A re-enrolment chunk of many subjects is split into packs of at most ``max_images``: no engine call is longer
    than one batch, and a verify that arrives while the chunk runs goes before its next pack."""
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    b = MicroBatcher(eng, max_images=4, fill_timeout_s=30.0, expected=lambda: NOTHING)
    chunk = Submitter(b, "reenroll", [item(f"c{i}") for i in range(10)], background=True)
    chunk.start()
    wait_until(lambda: b.running_since() is not None)  # its first pack runs (held at the gate)
    user = Submitter(b, "verify", [item("v1")])
    user.start()
    wait_until(lambda: pending(b) == 3)  # two more packs of the chunk and the verify
    gate.set()
    for t in (chunk, user):
        t.join(20)
        assert t.error is None and not t.is_alive()
    assert chunk.result == [("reenroll", f"c{i}") for i in range(10)]  # one result per subject, in order
    assert eng.batches() == [["c0", "c1", "c2", "c3"], ["v1"], ["c4", "c5", "c6", "c7"], ["c8", "c9"]]


def test_background_work_goes_one_subject_at_a_time_under_its_own_cap() -> None:
    """``background_max_images=1`` (an engine that runs images one by one): a background chunk runs a subject per
    call, never joins an interactive batch, and a verify that arrives waits for at most one subject."""
    gate = threading.Event()
    eng = FakeEngine(gate=gate)
    b = MicroBatcher(eng, max_images=4, fill_timeout_s=30.0, background_max_images=1, expected=lambda: NOTHING)
    chunk = Submitter(b, "enroll", [item(f"c{i}") for i in range(3)] + [item("two", 2)], background=True)
    chunk.start()
    wait_until(lambda: b.running_since() is not None)  # c0 runs, held at the gate
    users = [Submitter(b, "enroll", [item("e1")]), Submitter(b, "enroll", [item("e2")])]
    for i, t in enumerate(users):
        t.start()
        wait_until(lambda i=i: pending(b) == 3 + i + 1)  # c1, c2, two, then the users
    gate.set()
    for t in (chunk, *users):
        t.join(20)
        assert t.error is None and not t.is_alive()
    assert chunk.result == [("enroll", t) for t in ("c0", "c1", "c2", "two")]
    # interactive work batches together; background never joins it; a 2-image subject runs whole, alone
    assert eng.batches() == [["c0"], ["e1", "e2"], ["c1"], ["c2"], ["two"]]
    with pytest.raises(ValueError):
        MicroBatcher(eng, max_images=4, fill_timeout_s=0.0, background_max_images=0)


def test_background_work_waits_for_interactive_work_being_prepared_but_not_beyond_mate_wait() -> None:
    coming = {"now": Coming({"verify": 1}, 0, 1)}  # a verify is being downloaded and aligned in this process
    eng = FakeEngine()
    b = MicroBatcher(eng, max_images=4, fill_timeout_s=0.0, mate_wait_s=30.0, expected=lambda: coming["now"])
    bulk = Submitter(b, "enroll", [item(f"b{i}") for i in range(4)], background=True)  # a full batch, ready
    bulk.start()
    wait_until(lambda: pending(b) == 1)
    time.sleep(0.2)
    assert eng.batches() == []  # held back for the verify
    user = Submitter(b, "verify", [item("v1")])
    coming["now"] = Coming({}, 0, 0)
    user.start()
    for t in (bulk, user):
        t.join(20)
        assert t.error is None and not t.is_alive()
    assert eng.batches() == [["v1"], ["b0", "b1", "b2", "b3"]]

    held = MicroBatcher(
        FakeEngine(), max_images=4, fill_timeout_s=0.0, mate_wait_s=0.3, expected=lambda: Coming({"verify": 1}, 0, 1)
    )  # the verify never comes
    t0 = time.monotonic()
    assert held.submit("enroll", [item("b")], background=True) == [("enroll", "b")]
    assert 0.25 <= time.monotonic() - t0 < 10  # held at most mate_wait_s


def test_background_flag_is_scoped_with_the_delivery() -> None:
    assert current_delivery() == (1, False)
    with delivery_attempt(1, background=True):
        assert current_delivery() == (1, True)
        with delivery_attempt(2):
            assert current_delivery() == (2, False)
        assert current_delivery() == (1, True)
    assert current_delivery() == (1, False)


def test_work_preparing_for_another_lane_is_not_waited_for() -> None:
    eng = FakeEngine()
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=30.0, mate_wait_s=30.0, expected=lambda: Coming({"enroll": 5}))
    (v,) = submit_in_order(b, [("verify", [item("probe")])])
    assert v.result == [("verify", "probe")] and v.elapsed < 20  # five enrols on their way do not hold a verify


def test_lanes_are_never_mixed() -> None:
    eng = FakeEngine()
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=0.2, expected=lambda: Coming({"enroll": 1, "verify": 1}))
    ts = submit_in_order(
        b, [("enroll", [item("e1")]), ("verify", [item("v1")]), ("enroll", [item("e2")]), ("verify", [item("v2")])]
    )
    assert [t.result for t in ts] == [[("enroll", "e1")], [("verify", "v1")], [("enroll", "e2")], [("verify", "v2")]]
    assert sorted(map(tuple, eng.batches())) == [("e1", "e2"), ("v1", "v2")]
    assert {lane for lane, _ in eng.calls} == {"enroll", "verify"}


def test_a_failing_member_fails_alone_and_its_batch_mates_succeed() -> None:
    eng = FakeEngine(bad=frozenset({"poison"}))
    coming = {"now": NOTHING}
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=30.0, expected=lambda: coming["now"])
    specs = [("enroll", [item("ok1")]), ("enroll", [item("poison")]), ("enroll", [item("ok2")])]
    ts = submit_in_order(b, specs, coming=coming)
    assert ts[0].result == [("enroll", "ok1")] and ts[0].error is None
    assert ts[2].result == [("enroll", "ok2")] and ts[2].error is None
    assert isinstance(ts[1].error, ValueError) and ts[1].result is None
    # one batched call that raised, then each member alone
    assert eng.batches() == [["ok1", "poison", "ok2"], ["ok1"], ["poison"], ["ok2"]]
    # the engine thread lives on
    (t,) = submit_in_order(b, [("enroll", [item("after")])])
    b2 = eng.batches()
    assert t.result == [("enroll", "after")] and b2[-1] == ["after"]


def test_a_lone_failure_is_not_run_twice() -> None:
    eng = FakeEngine(bad=frozenset({"poison"}))
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=0.0)
    (t,) = submit_in_order(b, [("enroll", [item("poison")])])
    assert isinstance(t.error, ValueError) and eng.batches() == [["poison"]]


def test_alone_submissions_and_batching_off_run_one_per_call() -> None:
    eng = FakeEngine()
    coming = {"now": NOTHING}
    b = MicroBatcher(eng, max_images=8, fill_timeout_s=30.0, expected=lambda: coming["now"])
    specs = [("enroll", [item("a")]), ("enroll", [item("re")]), ("enroll", [item("b")])]
    ts = submit_in_order(b, specs, alone={1}, coming=coming)
    assert [t.result for t in ts] == [[("enroll", "a")], [("enroll", "re")], [("enroll", "b")]]
    assert ["re"] in eng.batches() and ["a", "b"] in eng.batches()

    eng2 = FakeEngine()
    off = MicroBatcher(eng2, max_images=8, fill_timeout_s=30.0, expected=lambda: Coming({"enroll": 2}), merge=False)
    ts = submit_in_order(off, [("enroll", [item("x")]), ("enroll", [item("y")]), ("enroll", [item("z")])])
    assert [t.result for t in ts] == [[("enroll", "x")], [("enroll", "y")], [("enroll", "z")]]
    assert sorted(eng2.batches()) == [["x"], ["y"], ["z"]]


def test_a_wrong_result_count_fails_the_submitters_instead_of_misrouting() -> None:
    b = MicroBatcher(lambda lane, items: [None], max_images=8, fill_timeout_s=0.0, expected=lambda: NOTHING)
    with pytest.raises(RuntimeError, match="2 items"):
        b.submit("enroll", [item("a"), item("b")])


def test_delivery_attempt_is_scoped() -> None:
    assert current_delivery()[0] == 1
    with delivery_attempt(3):
        assert current_delivery()[0] == 3
    assert current_delivery()[0] == 1


def test_in_flight_counts_tasks_preparing_per_lane_and_notifies() -> None:
    now = [5.0]
    f = InFlight(clock=lambda: now[0])
    woken: list[int] = []
    f.listen(lambda: woken.append(1))
    f.started(lane="enroll")
    release = threading.Event()
    others = []
    for lane, t, bg in (("enroll", 4.0, True), (None, 3.0, False), ("verify", 6.0, False)):
        ready = threading.Event()

        def task(lane: str | None = lane, t: float = t, bg: bool = bg, ready: threading.Event = ready) -> None:
            now[0] = t
            f.started(lane=lane, background=bg)
            ready.set()
            release.wait(10)  # alive until the end: a finished thread's ident may be reused

        others.append(threading.Thread(target=task))
        others[-1].start()
        ready.wait(10)
    assert f.preparing() == {"enroll": 2, "verify": 1} and f.oldest_start() == 3.0
    assert f.preparing_interactive() == 2  # this thread's enrol and the verify; the background enrol is not
    f.submitting()  # this thread hands its work over: no longer preparing, waiting for the engine thread
    assert f.preparing() == {"enroll": 1, "verify": 1} and f.preparing_interactive() == 1
    f.finished()
    assert f.preparing() == {"enroll": 1, "verify": 1} and len(woken) == 5
    release.set()
    for o in others:
        o.join(10)


def test_the_watchdog_clock_stops_while_a_task_waits_for_the_engine() -> None:
    """A task queued behind other engine batches is not stuck: its wait does not count toward the hard limit (the
    batch that runs has its own clock); its own work before and after does."""
    now = [100.0]
    f = InFlight(clock=lambda: now[0])
    f.started(lane="reenroll", background=True)
    now[0] = 110.0
    f.submitting()
    assert f.oldest_start() is None  # only waiting tasks: nothing of this process can be stuck but a batch
    now[0] = 500.0
    f.resumed()  # 390 s in the queue
    assert f.oldest_start() == 100.0 + 390.0
    f.finished()
    assert f.oldest_start() is None


def test_watchdog_fires_only_past_the_limit() -> None:
    now = {"t": 100.0}
    fired: list[int] = []
    starts: dict[str, float | None] = {"task": None, "batch": None}
    dog = Watchdog(
        10.0,
        [lambda: starts["task"], lambda: starts["batch"]],
        on_overrun=lambda: fired.append(1),
        clock=lambda: now["t"],
    )
    assert dog.check() is False  # nothing running
    starts["task"] = 95.0
    starts["batch"] = 99.0
    assert dog.check() is False and not fired
    now["t"] = 105.5  # the task started 10.5 s ago
    assert dog.check() is True and fired == [1]


def test_engine_call_packs_once_and_observes_the_size_of_every_real_engine_call() -> None:
    from types import SimpleNamespace

    import numpy as np

    from worker import metrics
    from worker.service.engine import EngineCall

    calls: list[int] = []

    class FakeEngine:
        config = SimpleNamespace(max_batch_images=4, steps=5)

        def __call__(self, batch: list[Any]) -> list[Any]:  # ONE engine batch: no packing of its own
            calls.append(sum(len(f) for f, _ in batch))
            return [SimpleNamespace(n=len(f)) for f, _ in batch]

    call = EngineCall(SimpleNamespace(engine=FakeEngine()))  # type: ignore[arg-type]
    assert call.max_images == 4

    def sample(name: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, {"job_type": "reenroll"}) or 0.0

    before = (sample("cancelable_batch_size_images_count"), sample("cancelable_batch_size_images_sum"))
    items = [(np.zeros((n, 3, 2, 2)), b"s" * 32) for n in (2, 2, 3, 6, 1)]
    out = call("reenroll", items)  # type: ignore[arg-type]
    assert [r.n for r in out] == [2, 2, 3, 6, 1]  # one result per subject, in order
    assert calls == [4, 3, 6, 1]  # packed by max_batch_images; a subject over the cap alone
    after = (sample("cancelable_batch_size_images_count"), sample("cancelable_batch_size_images_sum"))
    assert (after[0] - before[0], after[1] - before[1]) == (4, 14)


def test_expected_submitters_counts_queued_messages_for_free_task_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = InFlight()
    monkeypatch.setattr(inflight, "INFLIGHT", tasks)
    asked: list[str] = []

    class FakeRedis:
        depth: dict[str, int] | Exception = dict.fromkeys(ENGINE_QUEUES, 10)

        def llen(self, name: str) -> int:
            asked.append(name)
            if isinstance(self.depth, Exception):
                raise self.depth
            return self.depth.get(name, 0)

    r = FakeRedis()
    tasks.started(lane="enroll")  # this thread: one engine task in flight, preparing
    assert inflight.expected_submitters(r) == Coming({"enroll": 1}, 0, 1) and asked == []  # capacity 1: no broker
    tasks.capacity = 4
    # 3 free slots; every engine queue counts
    assert inflight.expected_submitters(r) == Coming({"enroll": 1}, 3, 1) and asked == list(ENGINE_QUEUES)
    r.depth = {ENGINE_BULK_QUEUE: 1, LEGACY_ENGINE_QUEUE: 1}
    assert inflight.expected_submitters(r) == Coming({"enroll": 1}, 2, 1)
    r.depth = ConnectionError("broker away")
    assert inflight.expected_submitters(r) == Coming({"enroll": 1}, 0, 1)
    tasks.submitting()
    assert inflight.expected_submitters(r) == Coming({}, 0)
