"""The Celery configuration: JSON only, late acks, reject on worker lost, prefetch 1, the visibility timeout checked
against the hard time limit, routing by task name; importing the app loads no models (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.broker.config import (
    CONTROL_QUEUE,
    ENGINE_BULK_QUEUE,
    ENGINE_INTERACTIVE_QUEUE,
    LEGACY_ENGINE_QUEUE,
    TASK_BULK,
    TASK_ENROLL,
    TASK_REENROLL_CHUNK,
    TASK_REVOKE,
    TASK_SWEEP_STAGING,
    TASK_VERIFY,
    ConfigError,
    QueueSettings,
    celery_config,
    check_queue_settings,
)

REPO = Path(__file__).resolve().parents[3]


def _q(**kw: int | bool) -> QueueSettings:
    base = {"visibility_timeout_s": 3600, "task_time_limit_s": 900, "task_soft_time_limit_s": 810}
    base.update(kw)
    return QueueSettings(broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/0", **base)


def test_safe_defaults() -> None:
    c = celery_config(_q())
    assert c["task_serializer"] == "json" and c["result_serializer"] == "json"
    assert c["accept_content"] == ["json"] and c["result_accept_content"] == ["json"]
    assert c["task_acks_late"] is True and c["task_reject_on_worker_lost"] is True
    assert c["worker_prefetch_multiplier"] == 1
    assert c["broker_transport_options"]["visibility_timeout"] == 3600
    assert c["task_time_limit"] == 900 and c["task_soft_time_limit"] == 810
    assert c["worker_proc_alive_timeout"] >= 60  # a model load in worker_process_init is not a hung child


def test_routes_by_name() -> None:
    routes = celery_config(_q())["task_routes"]
    assert {routes[t]["queue"] for t in (TASK_ENROLL, TASK_VERIFY)} == {ENGINE_INTERACTIVE_QUEUE}
    assert routes[TASK_REENROLL_CHUNK]["queue"] == ENGINE_BULK_QUEUE
    assert {routes[t]["queue"] for t in (TASK_REVOKE, TASK_BULK)} == {CONTROL_QUEUE}


def test_beat_schedules_the_staging_sweep_and_the_reconciler_on_the_control_queue() -> None:
    c = celery_config(_q(sweep_staging_interval_s=600))
    entry = c["beat_schedule"]["sweep-staging"]
    assert entry["task"] == TASK_SWEEP_STAGING and entry["schedule"] == 600.0
    assert c["task_routes"][TASK_SWEEP_STAGING]["queue"] == CONTROL_QUEUE
    assert c["beat_schedule"]["sweep-uploads"]["task"] == "cancelable.sweep_uploads"
    assert "sweep-uploads" not in celery_config(_q(sweep_uploads=False))["beat_schedule"]
    off = celery_config(_q(sweep_staging_interval_s=0))["beat_schedule"]
    assert (
        "sweep-staging" not in off and "sweep-uploads" not in off and off["reconcile"]["task"] == "cancelable.reconcile"
    )  # always scheduled
    assert c["task_routes"]["cancelable.reconcile"]["queue"] == CONTROL_QUEUE


@pytest.mark.parametrize("vt", [900, 600, 1])
def test_visibility_timeout_must_exceed_hard_limit(vt: int) -> None:
    with pytest.raises(ConfigError, match="visibility_timeout .* must exceed the task hard time limit"):
        check_queue_settings(_q(visibility_timeout_s=vt))


def test_soft_limit_below_hard_limit() -> None:
    with pytest.raises(ConfigError, match="soft time limit"):
        check_queue_settings(_q(task_soft_time_limit_s=900))


def _run(code: str, env: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if not k.upper().startswith("CANCELABLE_")}
    full["CANCELABLE_REDIS__URL"] = "redis://127.0.0.1:1/0"  # never contacted by these tests
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    full["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=REPO, timeout=120)


def test_worker_app_import_is_light_and_configured() -> None:
    code = (
        "import sys, json\n"
        "import worker.tasks.app as a\n"
        "a.app.loader.import_default_modules()\n"
        "c = a.app.conf\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'boto3': 'boto3' in sys.modules,"
        " 'accept': list(c.accept_content), 'acks_late': c.task_acks_late, 'prefetch': c.worker_prefetch_multiplier,"
        " 'vt': c.broker_transport_options['visibility_timeout'], 'limit': c.task_time_limit,"
        " 'tasks': sorted(t for t in a.app.tasks if t.startswith('cancelable.'))}))\n"
    )
    r = _run(code, {"CANCELABLE_WORKER__TASK_TIME_LIMIT": "100", "CANCELABLE_WORKER__VISIBILITY_TIMEOUT": "130"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] is False  # models load after fork, never at import
    assert out["accept"] == ["json"] and out["acks_late"] is True and out["prefetch"] == 1
    assert (out["vt"], out["limit"]) == (130, 100)
    assert {TASK_ENROLL, TASK_VERIFY, TASK_REVOKE, TASK_BULK, TASK_REENROLL_CHUNK} <= set(out["tasks"])


def test_worker_without_a_redis_url_stops_with_one_clear_message() -> None:
    r = _run("import worker.tasks.app", {"CANCELABLE_REDIS__URL": None})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "CANCELABLE_REDIS__URL: not set" in r.stderr and len(r.stderr.strip().splitlines()) <= 4


def test_worker_refuses_visibility_timeout_below_time_limit() -> None:
    r = _run(
        "import worker.tasks.app",
        {"CANCELABLE_WORKER__TASK_TIME_LIMIT": "100", "CANCELABLE_WORKER__VISIBILITY_TIMEOUT": "60"},
    )
    assert r.returncode == 2
    assert "visibility_timeout" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 4


def test_producer_import_is_light() -> None:
    r = _run("import sys, producers.cli, producers.client; print('torch' in sys.modules, 'boto3' in sys.modules)", {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_bundle_advice_applies_unless_the_deployment_set_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.bundle_config import engine_config, verify_threshold
    from worker.settings import load_settings

    for k in [k for k in __import__("os").environ if k.upper().startswith("CANCELABLE_")]:
        monkeypatch.delenv(k)
    advice = {"engine": {"steps": 30, "key_target": True, "verify_threshold": 0.3, "unknown_knob": 1}}
    s = load_settings()
    cfg = engine_config(advice, s.engine)
    assert (cfg.steps, cfg.key_target, cfg.max_batch_images) == (30, True, s.engine.batch_size)
    assert verify_threshold(advice, s.engine) == 0.3
    assert engine_config({}, s.engine).steps == s.engine.steps and verify_threshold({}, s.engine) == 0.5
    monkeypatch.setenv("CANCELABLE_ENGINE__STEPS", "7")
    monkeypatch.setenv("CANCELABLE_ENGINE__VERIFY_THRESHOLD", "0.6")
    s = load_settings()
    assert engine_config(advice, s.engine).steps == 7 and verify_threshold(advice, s.engine) == 0.6


def test_workers_poll_interactive_work_first_whatever_the_q_order() -> None:
    from kombu.utils.scheduling import cycle_by_name

    strategy = celery_config(_q())["broker_transport_options"]["queue_order_strategy"]
    cycle = cycle_by_name(strategy)()
    cycle.update([ENGINE_BULK_QUEUE, "other", CONTROL_QUEUE, LEGACY_ENGINE_QUEUE, ENGINE_INTERACTIVE_QUEUE])
    expected = [ENGINE_INTERACTIVE_QUEUE, LEGACY_ENGINE_QUEUE, CONTROL_QUEUE, ENGINE_BULK_QUEUE, "other"]
    assert cycle.consume(5) == expected
    cycle.rotate(ENGINE_INTERACTIVE_QUEUE)  # kombu calls this after each message: the order must not change
    assert cycle.consume(5) == expected


def test_the_bulk_queue_is_left_out_of_the_poll_while_the_background_gate_is_closed() -> None:
    from kombu.utils.scheduling import cycle_by_name

    from worker.broker import order

    cycle = cycle_by_name(celery_config(_q())["broker_transport_options"]["queue_order_strategy"])()
    cycle.update([ENGINE_BULK_QUEUE, LEGACY_ENGINE_QUEUE, ENGINE_INTERACTIVE_QUEUE])
    everything = [ENGINE_INTERACTIVE_QUEUE, LEGACY_ENGINE_QUEUE, ENGINE_BULK_QUEUE]
    room = [True]
    order.gate_background(lambda: room[0])
    try:
        assert cycle.consume(3) == everything
        room[0] = False  # the slots background work may take are all busy
        assert cycle.consume(3) == [ENGINE_INTERACTIVE_QUEUE, LEGACY_ENGINE_QUEUE]
        bulk_only = cycle_by_name(celery_config(_q())["broker_transport_options"]["queue_order_strategy"])()
        bulk_only.update([ENGINE_BULK_QUEUE])
        assert bulk_only.consume(1) == [ENGINE_BULK_QUEUE]  # a bulk-only worker never polls nothing
        room[0] = True
        assert cycle.consume(3) == everything
    finally:
        order.gate_background(None)
