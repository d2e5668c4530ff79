"""worker.metrics: names and closed label sets, helper semantics, the multi-process lifecycle (real forked
processes, a SIGKILLed child), and the queue collector against a private redis-server with real Celery messages."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker import metrics as m
from worker.errors import NoFaceError, StorageError

REPO = Path(__file__).resolve().parents[3]


def value(name: str, **labels: str) -> float:
    v = m.REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


# --- declarations ---------------------------------------------------------------------------------------------------
def test_every_metric_is_prefixed_with_a_unit_suffix_and_bounded_labels():
    units = ("_total", "_seconds", "_images", "_bytes", "_ratio", "_steps", "_processes", "_in_flight")
    names = set()
    for fam in m.REGISTRY.collect():
        names.add(fam.name)
        assert fam.name.startswith("cancelable_"), fam.name
        full = fam.name + ("_total" if fam.type == "counter" else "")
        assert full.endswith(units), f"{full} has no unit suffix"
    assert len(names) >= 15
    for metric in (m.JOBS, m.IMAGES, m.STAGE_SECONDS, m.RETRIES, m.DEAD_LETTERED, m.GPU_ALLOCATED):
        for label in metric._labelnames:
            assert label in ("job_type", "outcome", "error_code", "stage", "kind", "gpu", "device_type"), label
            assert "id" not in label


def test_alerted_counters_start_at_zero():
    """Alert rules use increase() on these: a series that first appears at 1 would never fire. In a fresh process
    (this one's registry has counted other tests' jobs) every alerted series exists at 0 before any job."""
    code = (
        "import json, worker.metrics as m\n"
        "dl = [m.REGISTRY.get_sample_value('cancelable_jobs_dead_lettered_total', {'job_type': j})"
        " for j in m.JOB_TYPES]\n"
        "fo = [m.REGISTRY.get_sample_value('cancelable_fanout_items_total', {'kind': k, 'outcome': 'failed'})"
        " for k in m.PROGRESS_KINDS]\n"
        "print(json.dumps([dl, fo]))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PROMETHEUS_MULTIPROC_DIR", "CANCELABLE_METRICS__MULTIPROC_DIR")
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO)
    dead_lettered, fanout_failed = json.loads(out.stdout)
    assert dead_lettered == [0.0] * len(m.JOB_TYPES)
    assert fanout_failed == [0.0] * len(m.PROGRESS_KINDS)


def test_the_package_re_exports_each_submodule_name_once():
    """``worker.metrics.X`` is the object its submodule defines, for every public name; no two submodules export one
    name (the package would silently serve the first)."""
    import importlib

    seen: dict[str, str] = {}
    for sub in m.SUBMODULES:
        module = importlib.import_module(f"worker.metrics.{sub}")
        for name in module.__all__:
            assert name not in seen, f"{name} exported by {seen.get(name)} and {sub}"
            seen[name] = sub
            assert getattr(m, name) is getattr(module, name)
    assert {"track_job", "REGISTRY", "QueueCollector", "build_registry", "install_celery_hooks"} <= set(seen)
    assert set(seen) <= set(dir(m))
    with pytest.raises(AttributeError):
        m.no_such_metric  # noqa: B018


def test_error_codes_are_the_error_hierarchy():
    from worker.contracts.codes import ErrorCode

    assert {c.value for c in ErrorCode} | {m.NO_ERROR} == set(m.ERROR_CODES)


@pytest.mark.parametrize(
    "call",
    [
        lambda: m.job_finished("enroll", "succeeded", "job-1234"),  # an ID where a code belongs
        lambda: m.job_finished("tenant-acme", "succeeded"),
        lambda: m.job_finished("enroll", "exploded"),
        lambda: m.job_finished("enroll", "succeeded", "no_face"),  # success carries no error code
        lambda: m.stage_timer("subject-42", "enroll").__enter__(),
        lambda: m.images_processed(1, "succeeded", "3f2a6b1c"),
        lambda: m.fanout_items("revoke-job-99"),
        lambda: m.QueueCollector(None, queues=["celery"]),
    ],
)
def test_labels_outside_the_closed_sets_are_refused(call):
    with pytest.raises(ValueError):
        call()


# --- helpers --------------------------------------------------------------------------------------------------------
def test_track_job_counts_outcomes_duration_and_in_flight():
    ok0 = value("cancelable_jobs_total", job_type="enroll", outcome="succeeded", error_code="none")
    nf0 = value("cancelable_jobs_total", job_type="enroll", outcome="failed", error_code="no_face")
    ie0 = value("cancelable_jobs_total", job_type="enroll", outcome="failed", error_code="internal_error")
    dup0 = value("cancelable_jobs_total", job_type="enroll", outcome="duplicate", error_code="none")
    dl0 = value("cancelable_jobs_dead_lettered_total", job_type="enroll")
    dlc0 = value("cancelable_jobs_total", job_type="enroll", outcome="dead_lettered", error_code="storage_error")
    rt0 = value("cancelable_task_retries_total", job_type="enroll")
    n0 = value("cancelable_job_duration_seconds_count", job_type="enroll")

    with m.track_job("enroll"):
        assert value("cancelable_jobs_in_flight", job_type="enroll") == 1
    with pytest.raises(NoFaceError), m.track_job("enroll"):
        raise NoFaceError("no face")
    with pytest.raises(RuntimeError), m.track_job("enroll"):
        raise RuntimeError("bug")
    with m.track_job("enroll") as t:
        t.outcome = "duplicate"
    with pytest.raises(StorageError), m.track_job("enroll") as t:
        t.outcome = "dead_lettered"
        raise StorageError("gave up")
    with pytest.raises(StorageError), m.track_job("enroll") as t:
        t.retrying = True
        raise StorageError("transient")

    assert value("cancelable_jobs_total", job_type="enroll", outcome="succeeded", error_code="none") == ok0 + 1
    assert value("cancelable_jobs_total", job_type="enroll", outcome="failed", error_code="no_face") == nf0 + 1
    assert value("cancelable_jobs_total", job_type="enroll", outcome="failed", error_code="internal_error") == ie0 + 1
    assert value("cancelable_jobs_total", job_type="enroll", outcome="duplicate", error_code="none") == dup0 + 1
    assert value("cancelable_jobs_dead_lettered_total", job_type="enroll") == dl0 + 1
    assert (
        value("cancelable_jobs_total", job_type="enroll", outcome="dead_lettered", error_code="storage_error")
        == dlc0 + 1
    )
    assert value("cancelable_task_retries_total", job_type="enroll") == rt0 + 1
    assert value("cancelable_job_duration_seconds_count", job_type="enroll") == n0 + 6
    assert value("cancelable_jobs_in_flight", job_type="enroll") == 0


def test_celery_retry_counts_a_retry_not_a_failure():
    from celery.exceptions import Retry

    rt0 = value("cancelable_task_retries_total", job_type="verify")
    f0 = sum(
        s.value
        for fam in m.REGISTRY.collect()
        if fam.name == "cancelable_jobs"
        for s in fam.samples
        if s.labels.get("job_type") == "verify" and s.labels.get("outcome") == "failed"
    )
    from worker.errors import KeyProviderUnavailable

    with pytest.raises(Retry), m.track_job("verify"):
        try:
            raise KeyProviderUnavailable("kms down")
        except KeyProviderUnavailable as exc:
            raise Retry("retry", exc=exc) from exc
    assert value("cancelable_task_retries_total", job_type="verify") == rt0 + 1
    f1 = sum(
        s.value
        for fam in m.REGISTRY.collect()
        if fam.name == "cancelable_jobs"
        for s in fam.samples
        if s.labels.get("job_type") == "verify" and s.labels.get("outcome") == "failed"
    )
    assert f1 == f0


def test_stage_timer_batch_steps_images_fanout_and_model_load():
    c0 = value("cancelable_stage_duration_seconds_count", stage="optimise", job_type="reenroll")
    s0 = value("cancelable_stage_duration_seconds_sum", stage="optimise", job_type="reenroll")
    with m.stage_timer("optimise", "reenroll"):
        time.sleep(0.02)
    with pytest.raises(ZeroDivisionError), m.stage_timer("optimise", "reenroll"):
        _ = 1 / 0
    assert value("cancelable_stage_duration_seconds_count", stage="optimise", job_type="reenroll") == c0 + 2
    assert value("cancelable_stage_duration_seconds_sum", stage="optimise", job_type="reenroll") - s0 >= 0.02

    b0 = value("cancelable_batch_size_images_sum", job_type="bulk")
    m.batch_size("bulk", 12)
    assert value("cancelable_batch_size_images_sum", job_type="bulk") == b0 + 12
    assert value("cancelable_batch_size_images_bucket", job_type="bulk", le="16.0") >= 1

    st0 = value("cancelable_optimisation_steps_total", job_type="enroll")
    m.optimisation_steps("enroll", 50)
    m.optimisation_steps("enroll", 30)
    assert value("cancelable_optimisation_steps_total", job_type="enroll") == st0 + 80

    i0 = value("cancelable_images_total", job_type="enroll", outcome="failed", error_code="invalid_image")
    m.images_processed(3, "failed", "enroll", "invalid_image")
    assert value("cancelable_images_total", job_type="enroll", outcome="failed", error_code="invalid_image") == i0 + 3

    f0 = value("cancelable_fanout_items_total", kind="revoke", outcome="succeeded")
    m.fanout_items("revoke", 5)
    assert value("cancelable_fanout_items_total", kind="revoke", outcome="succeeded") == f0 + 5

    with m.model_load_timer("cpu"):
        time.sleep(0.01)
    assert value("cancelable_model_load_duration_seconds_count", device_type="cpu") >= 1
    assert value("cancelable_worker_processes", device_type="cpu") == 1


def test_error_code_of():
    assert m.error_code_of(NoFaceError("x")) == "no_face"
    assert m.error_code_of(ValueError("x")) == "internal_error"


def test_update_gpu_metrics_is_a_noop_without_cuda():
    m.update_gpu_metrics()  # must neither import torch nor fail
    names = {
        s.labels.get("gpu")
        for fam in m.REGISTRY.collect()
        if fam.name.startswith("cancelable_gpu")
        for s in fam.samples
    }
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        assert names == set()


def test_progress_collector_sums_open_jobs_without_ids():
    snaps = [
        m.ProgressSnapshot("revoke", done=40, total=100, failed=2),
        m.ProgressSnapshot("revoke", done=10, total=10),
        m.ProgressSnapshot("bulk", done=5, total=1000),
    ]
    reg = m.build_registry(progress_source=lambda: iter(snaps))
    assert reg.get_sample_value("cancelable_progress_open_jobs", {"kind": "revoke"}) == 2
    assert reg.get_sample_value("cancelable_progress_done_items", {"kind": "revoke"}) == 50
    assert reg.get_sample_value("cancelable_progress_failed_items", {"kind": "revoke"}) == 2
    assert reg.get_sample_value("cancelable_progress_total_items", {"kind": "revoke"}) == 110
    assert reg.get_sample_value("cancelable_progress_total_items", {"kind": "bulk"}) == 1000
    for fam in reg.collect():
        if fam.name.startswith("cancelable_progress"):
            assert all(set(s.labels) == {"kind"} for s in fam.samples)


def test_metrics_server_serves_the_registry():
    server, _ = m.start_metrics_server(0, addr="127.0.0.1")
    try:
        m.job_finished("verify", "succeeded")
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    assert "cancelable_jobs" in fams and "cancelable_stage_duration_seconds" in fams
    assert not any(n.endswith("_created") for n in fams)


# --- multi-process ------------------------------------------------------------------------------------------------
CHILD_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time, json, multiprocessing as mp
    from worker.metrics.multiproc import prepare_multiproc_dir
    prepare_multiproc_dir()  # the entry point's set-up, before prometheus_client is imported
    from prometheus_client import multiprocess
    from worker import metrics as m

    def work(i, hold):
        with m.track_job("enroll"):
            for _ in range(i + 1):
                with m.stage_timer("download", "enroll"):
                    pass
            m.images_processed(i + 1, "succeeded", "enroll")
            if hold:
                time.sleep(60)  # killed with SIGKILL while "in flight"
        m.IN_FLIGHT.labels("enroll")  # touch
        multiprocess.mark_process_dead(os.getpid())  # what worker_process_shutdown does

    if __name__ == "__main__":
        stale = os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "counter_999999.db")
        open(stale, "wb").close()
        removed = m.cleanup_multiproc_dir()
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=work, args=(i, False)) for i in range(3)]
        for p in procs: p.start()
        for p in procs: p.join()
        held = ctx.Process(target=work, args=(9, True)); held.start()
        reg = m.build_registry()
        deadline = time.time() + 20
        while time.time() < deadline and not reg.get_sample_value("cancelable_jobs_in_flight", {"job_type": "enroll"}):
            time.sleep(0.05)
        in_flight_live = reg.get_sample_value("cancelable_jobs_in_flight", {"job_type": "enroll"})
        os.kill(held.pid, signal.SIGKILL); held.join()
        in_flight_after_kill = reg.get_sample_value("cancelable_jobs_in_flight", {"job_type": "enroll"})
        g = lambda n, **l: reg.get_sample_value(n, l)
        print(json.dumps({
            "multiprocess": m.MULTIPROCESS,
            "removed": removed,
            "jobs": g("cancelable_jobs_total", job_type="enroll", outcome="succeeded", error_code="none"),
            "stages": g("cancelable_stage_duration_seconds_count", stage="download", job_type="enroll"),
            "images": g("cancelable_images_total", job_type="enroll", outcome="succeeded", error_code="none"),
            "in_flight_live": in_flight_live,
            "in_flight_after_kill": in_flight_after_kill,
        }))
    """
)


def _run(code: str, env: dict[str, str]) -> Any:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env_without_dirs(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PROMETHEUS_MULTIPROC_DIR", "CANCELABLE_METRICS__MULTIPROC_DIR")
    }
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_importing_the_metrics_edits_no_environment(tmp_path):
    """The package and its definitions only read the environment: the multiprocess directory is the entry point's
    explicit set-up (``prepare_multiproc_dir``), not a side effect of an import."""
    configured = tmp_path / "configured"
    code = (
        "import json, os, sys\n"
        "import worker.metrics as m\n"
        "lazy = 'prometheus_client' not in sys.modules\n"
        "m.JOBS\n"
        "print(json.dumps([lazy, os.environ.get('PROMETHEUS_MULTIPROC_DIR'), m.MULTIPROCESS]))\n"
    )
    lazy, env_dir, multiprocess = _run(code, _env_without_dirs(CANCELABLE_METRICS__MULTIPROC_DIR=str(configured)))
    assert lazy is True  # importing the package alone loads no prometheus_client
    assert env_dir is None and multiprocess is False
    assert not configured.exists()


def test_prepare_multiproc_dir_sets_up_the_directory_before_prometheus_client(tmp_path):
    configured = tmp_path / "configured"
    code = (
        "import json, os\n"
        "from worker.metrics.multiproc import prepare_multiproc_dir\n"
        f"path = prepare_multiproc_dir({str(configured)!r})\n"
        "import worker.metrics as m\n"
        "m.job_finished('enroll', 'succeeded')\n"
        "print(json.dumps([path, os.environ['PROMETHEUS_MULTIPROC_DIR'], m.MULTIPROCESS, sorted(os.listdir(path))]))\n"
    )
    path, env_dir, multiprocess, files = _run(code, _env_without_dirs())
    assert path == env_dir == str(configured)
    assert multiprocess is True
    assert any(f.startswith("counter_") for f in files)  # the count went to the directory's files

    # the launcher's PROMETHEUS_MULTIPROC_DIR wins over the configured one
    launcher = tmp_path / "launcher"
    path, env_dir, multiprocess, _ = _run(code, _env_without_dirs(PROMETHEUS_MULTIPROC_DIR=str(launcher)))
    assert path == env_dir == str(launcher) and launcher.is_dir()

    # neither: a private temporary directory, removed when the process exits
    code = (
        "import json\n"
        "from worker.metrics.multiproc import prepare_multiproc_dir\n"
        "print(json.dumps(prepare_multiproc_dir()))\n"
    )
    private = _run(code, _env_without_dirs())
    assert "cancelable-metrics-" in private
    assert not os.path.exists(private)


def test_multiprocess_children_are_merged_and_dead_children_drop_out(tmp_path):
    mpdir = tmp_path / "prom"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mpdir), "PYTHONPATH": str(REPO)}
    script = tmp_path / "child.py"
    script.write_text(CHILD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["multiprocess"] is True
    assert res["removed"] == 1  # the stale file of pid 999999
    assert res["jobs"] == 3  # three children finished one job each; the killed one never finished
    assert res["stages"] == 1 + 2 + 3 + 10  # stage executions summed over children, the killed one's kept
    assert res["images"] == 1 + 2 + 3 + 10
    assert res["in_flight_live"] == 1  # the held child, seen from the parent
    assert not res["in_flight_after_kill"]  # SIGKILLed child's live gauge is dropped


# --- queue collector ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def private_redis(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    import redis

    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield port, client
    proc.terminate()
    proc.wait(10)


def test_queue_collector_reads_celery_queues(private_redis):
    from celery import Celery, signals

    port, client = private_redis
    app = Celery("t", broker=f"redis://127.0.0.1:{port}/0")
    signals.before_task_publish.connect(m.stamp_sent_at, weak=False)
    t0 = time.time()
    for _ in range(3):
        app.send_task("cancelable.enroll", args=[{}], queue="engine")  # a producer of an earlier release
    app.send_task("cancelable.enroll", args=[{}], queue="engine.bulk")
    app.send_task("cancelable.revoke", args=[{}], queue="control", priority=6)
    coll = m.QueueCollector(client, clock=lambda: t0 + 30)
    fams = {f.name: f for f in coll.collect()}
    lengths = {s.labels["queue"]: s.value for s in fams["cancelable_queue_length_messages"].samples}
    ages = {s.labels["queue"]: s.value for s in fams["cancelable_queue_oldest_message_age_seconds"].samples}
    assert lengths == {"engine.interactive": 0, "engine": 3, "engine.bulk": 1, "control": 1}
    assert 29 <= ages["engine"] <= 31 and 29 <= ages["control"] <= 31 and 29 <= ages["engine.bulk"] <= 31
    assert fams["cancelable_redis_up"].samples[0].value == 1

    # a message without the header is aged from when the collector first saw it
    client.delete("engine", "engine.bulk", "control")
    client.lpush("engine", json.dumps({"body": "", "headers": {"id": "abc"}, "properties": {}}))
    now = [1000.0]
    coll = m.QueueCollector(client, clock=lambda: now[0])
    list(coll.collect())
    now[0] = 1042.0
    fams = {f.name: f for f in coll.collect()}
    ages = {s.labels["queue"]: s.value for s in fams["cancelable_queue_oldest_message_age_seconds"].samples}
    assert ages == {"engine.interactive": 0.0, "engine": 42.0, "engine.bulk": 0.0, "control": 0.0}


def test_queue_collector_reports_broker_down():
    import redis

    coll = m.QueueCollector(redis.Redis(port=_free_port(), socket_connect_timeout=0.5))
    fams = {f.name: f for f in coll.collect()}
    assert fams["cancelable_redis_up"].samples[0].value == 0
    assert "cancelable_queue_length_messages" not in fams


def test_update_gpu_metrics_reads_torch_cuda(monkeypatch):
    """The sampling logic against a stand-in ``torch.cuda`` (no GPU on CI; the real CUDA path needs a device)."""
    from types import SimpleNamespace

    gib = 1 << 30
    cuda = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 2,
        memory_allocated=lambda i: (3 + i) * gib,
        memory_reserved=lambda i: (5 + i) * gib,
        get_device_properties=lambda i: SimpleNamespace(total_memory=80 * gib),
        utilization=lambda i: 40 + 10 * i,
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    m.update_gpu_metrics()
    assert value("cancelable_gpu_memory_allocated_bytes", gpu="1") == 4 * gib
    assert value("cancelable_gpu_memory_reserved_bytes", gpu="0") == 5 * gib
    assert value("cancelable_gpu_memory_total_bytes", gpu="1") == 80 * gib
    assert value("cancelable_gpu_utilisation_ratio", gpu="1") == 0.5
    cuda.is_initialized = lambda: False  # a process that never touched CUDA reports nothing new
    cuda.memory_allocated = lambda i: 0
    m.update_gpu_metrics()
    assert value("cancelable_gpu_memory_allocated_bytes", gpu="1") == 4 * gib
    for g in m.GPU_ALLOCATED, m.GPU_RESERVED, m.GPU_TOTAL, m.GPU_UTILISATION:
        g.clear()
