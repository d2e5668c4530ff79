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
