"""The per-process runtime under the engine worker's threads pool: racing task threads get one runtime and one of
each client, and the engine is loaded once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from worker.tasks import runtime


def _race(fn: Any, n: int = 12) -> list[Any]:
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        out[i] = fn()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_racing_threads_share_one_runtime_one_client_each_and_one_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import load_settings

    settings = load_settings(redis={"url": "redis://127.0.0.1:1/0"})
    monkeypatch.setattr("worker.settings.get_settings", lambda: settings)
    monkeypatch.setattr(runtime, "_runtime", None)
    built = {"redis": 0, "store": 0, "keys": 0, "engine": 0}

    def slow(kind: str) -> Any:
        def make(*_: Any) -> object:
            built[kind] += 1
            time.sleep(0.05)  # a wide window for a second thread to build another one
            return object()

        return make

    monkeypatch.setattr(runtime, "connect_redis", slow("redis"))
    monkeypatch.setattr(runtime, "connect_store", slow("store"))
    monkeypatch.setattr("worker.keys.providers.make_key_provider", slow("keys"))
    monkeypatch.setattr(runtime, "load_engine_from_settings", slow("engine"))

    rts = _race(runtime.get_runtime)
    assert all(rt is rts[0] for rt in rts)
    rt = rts[0]
    for kind, get in (
        ("redis", lambda: rt.redis),
        ("store", lambda: rt.store),
        ("keys", lambda: rt.keys),
        ("engine", rt.engine),
    ):
        got = _race(get)
        assert all(x is got[0] for x in got), kind
    assert built == {"redis": 1, "store": 1, "keys": 1, "engine": 1}


def test_engine_call_runs_the_jobs_subjects_through_the_batcher_and_a_redelivery_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``WorkerRuntime.engine_call``: the subjects of concurrent jobs meet in one engine batch of the process's
    batcher (over ``EngineCall``), each job gets its own results, and a re-delivered job's subjects run alone."""
    from types import SimpleNamespace

    from worker.settings import load_settings
    from worker.tasks.inflight import InFlight, delivery_attempt

    tasks = InFlight()
    monkeypatch.setattr(runtime, "INFLIGHT", tasks)
    batches: list[list[str]] = []
    gate = threading.Event()

    class FakeEngine:
        config = SimpleNamespace(max_batch_images=8, steps=1)
        images_independent = False  # batched: background work could share a batch

        def __call__(self, batch: list[Any]) -> list[Any]:
            gate.wait(10)
            batches.append([tag for _, tag in batch])
            return [f"out-{tag}" for _, tag in batch]

    settings = load_settings(redis={"url": "redis://127.0.0.1:1/0"}, engine={"batch_mate_wait_ms": 10_000})
    loaded = SimpleNamespace(engine=FakeEngine())
    monkeypatch.setattr(runtime, "load_engine_from_settings", lambda *_: loaded)
    rt = runtime.WorkerRuntime(settings)
    out: dict[str, Any] = {}

    def job(tag: str, attempt: int = 1) -> None:
        tasks.started(lane="enroll")
        try:
            with delivery_attempt(attempt):
                out[tag] = rt.engine_call("enroll", [([0], tag)])  # type: ignore[list-item]
        finally:
            tasks.finished()

    first = threading.Thread(target=job, args=("a",))
    first.start()
    while not batches and first.is_alive() and rt.batch_running_since() is None:
        time.sleep(0.01)  # "a" runs (blocked on the gate); "b" and "c" queue behind it
    others = [threading.Thread(target=job, args=("b",)), threading.Thread(target=job, args=("c",))]
    for t in others:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in [first, *others]:
        t.join(20)
    assert out == {"a": ["out-a"], "b": ["out-b"], "c": ["out-c"]}
    assert sorted(map(sorted, batches)) == [["a"], ["b", "c"]]  # b and c shared one engine batch

    batches.clear()
    retried = [threading.Thread(target=job, args=(tag, 2)) for tag in ("d", "e")]
    for t in retried:
        t.start()
    for t in retried:
        t.join(20)
    assert sorted(batches) == [["d"], ["e"]]  # re-deliveries run alone
    rt.close()
    assert rt.batcher().background_max_images == 8

    FakeEngine.images_independent = True  # images run one by one: background work goes a subject at a time
    rt1 = runtime.WorkerRuntime(settings)
    assert rt1.batcher().background_max_images == 1
    rt1.close()
