"""A real Prometheus (Debian package `prometheus`) scrapes a real Celery worker (prefork, 2 children, multiprocess
metrics) while it runs enrol, verify, a rejected input and a revocation against real Redis + SeaweedFS. Then:

- the scraped counters equal the jobs run, the histogram counts equal the stage executions those jobs imply, and
  Prometheus holds exactly what the worker's endpoint serves;
- every query of every Grafana dashboard (variables included) and every alert rule parses and is evaluated by that
  Prometheus; dashboard queries return a series (GPU queries only where the worker has CUDA), and every metric
  selector inside the alert rules returns a series; the loaded rules evaluate with health "ok".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from worker_harness import (
    create_input_bucket,
    settings_from_env,
    start_worker,
    upload,
    upload_faces,
    wait_ready,
    worker_env,
    write_random_lite_bundle,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
ENGINE_Q = "engine.interactive,engine,engine.bulk"
from test_infra_lint import all_queries  # noqa: E402

pytestmark = pytest.mark.integration

SCRAPE_S = 1
GPU_METRIC = re.compile(r"cancelable_gpu_")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Prometheus:
    """A private Prometheus server scraping ``targets`` (job name -> host:port) every second, alert rules loaded."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed (apt-get install prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "infra" / "prometheus" / "rules" / "alerts.yml", workdir / "alerts.yml")
        (workdir / "prometheus.yml").write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
                    "rule_files": ["alerts.yml"],
                    "scrape_configs": [
                        {"job_name": job, "static_configs": [{"targets": [t]}]} for job, t in targets.items()
                    ],
                }
            )
        )
        (self.port,) = _free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.3)
        raise RuntimeError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 = the query does not parse / evaluate
            return json.loads(e.read())

    def query(self, expr: str) -> list[dict]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr!r}: {body.get('errorType')}: {body.get('error')}"
        res = body["data"]["result"]
        return res if isinstance(res, list) else [res]

    def value(self, expr: str) -> float:
        res = self.query(expr)
        assert len(res) == 1, f"{expr!r} returned {len(res)} series"
        return float(res[0]["value"][1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _wait_for(fn, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except AssertionError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _faces() -> Path:
    shared = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))
    d = shared / "data" / "faces-smoke" / "obama-biden"
    if not d.is_dir():
        pytest.skip(f"sample faces not found at {d} (set CANCELABLE_SHARED_DIR)")
    return d


def test_prometheus_scrapes_a_real_worker(service_env, seaweed, tmp_path: Path) -> None:
    from producers.client import Client
    from worker.contracts import JobStatus
    from worker.keys.providers import write_keyring

    faces_dir = _faces()
    bucket = seaweed.new_bucket("prom")
    s3 = seaweed.client()
    inb = create_input_bucket(s3, bucket)
    faces = upload_faces(s3, bucket, faces_dir, max_side=256)
    corrupt = upload(s3, inb, "tenants/acme/corrupt.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg")
    metrics_port, control_port = _free_ports(2)
    env = worker_env(
        service_env,
        bucket,
        write_random_lite_bundle(tmp_path / "bundle"),
        CANCELABLE_METRICS__ENABLED="true",
        CANCELABLE_METRICS__HOST="127.0.0.1",
        CANCELABLE_METRICS__PORT=str(metrics_port),
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom-engine"),
    )
    control_env = {
        **env,
        "CANCELABLE_METRICS__PORT": str(control_port),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom-control"),
    }
    write_keyring(Path(env["CANCELABLE_KEYS__KEYRING_PATH"]), ["k1", "k2"])
    client = Client(settings_from_env(env))
    # as deployed: an engine worker (prefork, 2 children = 2 model copies) and a control worker, each serving metrics
    worker = start_worker(env, tmp_path / "engine.log", queues=ENGINE_Q, concurrency=2, name="engine")
    control = start_worker(control_env, tmp_path / "control.log", queues="control", concurrency=1, name="control")
    prom = None
    try:
        wait_ready(client, control, timeout=120, engine=False)
        wait_ready(client, worker, timeout=120)
        prom = Prometheus(
            tmp_path / "prometheus",
            {"cancelable-engine": f"127.0.0.1:{metrics_port}", "cancelable-control": f"127.0.0.1:{control_port}"},
        )
        _wait_for(lambda: prom.value("sum(up)") == 2, "first scrape of both workers")

        # --- the workload -------------------------------------------------------------------------------------
        jobs = [
            client.enroll_job("acme", "obama", [faces["obama"], faces["obama2"]], "k1"),
            client.enroll_job("acme", "biden", [faces["biden"]], "k1"),
            client.enroll_job("acme", "broken", [corrupt], "k1"),
        ]
        for j in jobs:
            client.submit(j)
        results = [client.wait(j.ref, timeout=240) for j in jobs]
        assert [r.status for r in results] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED], results
        assert results[2].error.code.value == "invalid_image"
        for subject in ("obama", "biden"):
            v = client.run(client.verify_job("acme", subject, faces["obama3"]), timeout=240)
            assert v.status == JobStatus.SUCCEEDED, v
        rv = client.run(client.revoke_job("acme", "test rotation", subject="obama"), timeout=240)
        assert rv.status == JobStatus.SUCCEEDED, rv

        expected = {
            # finished jobs by outcome and code
            'cancelable_jobs_total{job_type="enroll",outcome="succeeded",error_code="none"}': 2,
            'cancelable_jobs_total{job_type="enroll",outcome="failed",error_code="invalid_image"}': 1,
            'cancelable_jobs_total{job_type="verify",outcome="succeeded",error_code="none"}': 2,
            'cancelable_jobs_total{job_type="reenroll",outcome="succeeded",error_code="none"}': 1,
            'cancelable_job_duration_seconds_count{job_type="enroll"}': 3,
            'cancelable_job_duration_seconds_count{job_type="verify"}': 2,
            # images: 3 good + 1 corrupt enrolled, 2 probes, obama's 2 sources re-enrolled
            'cancelable_images_total{job_type="enroll",outcome="succeeded",error_code="none"}': 3,
            'cancelable_images_total{job_type="enroll",outcome="failed",error_code="invalid_image"}': 1,
            'cancelable_images_total{job_type="verify",outcome="succeeded",error_code="none"}': 2,
            'cancelable_images_total{job_type="reenroll",outcome="succeeded",error_code="none"}': 2,
            # stage executions implied by those jobs
            'cancelable_stage_duration_seconds_count{stage="download",job_type="enroll"}': 4,
            'cancelable_stage_duration_seconds_count{stage="decode",job_type="enroll"}': 4,
            'cancelable_stage_duration_seconds_count{stage="align",job_type="enroll"}': 3,
            'cancelable_stage_duration_seconds_count{stage="optimise",job_type="enroll"}': 2,
            'cancelable_stage_duration_seconds_count{stage="template",job_type="enroll"}': 2,
            'cancelable_stage_duration_seconds_count{stage="upload",job_type="enroll"}': 2,
            'cancelable_stage_duration_seconds_count{stage="download",job_type="verify"}': 2,
            'cancelable_stage_duration_seconds_count{stage="optimise",job_type="verify"}': 2,
            'cancelable_stage_duration_seconds_count{stage="download",job_type="reenroll"}': 2,
            'cancelable_stage_duration_seconds_count{stage="optimise",job_type="reenroll"}': 1,
            'cancelable_stage_duration_seconds_count{stage="upload",job_type="reenroll"}': 1,
            'cancelable_batch_size_images_sum{job_type="enroll"}': 3,
            'cancelable_batch_size_images_count{job_type="enroll"}': 2,
            'cancelable_fanout_items_total{kind="revoke",outcome="succeeded"}': 1,
            'cancelable_jobs_total{job_type="revoke",outcome="succeeded",error_code="none"}': 1,
            'cancelable_jobs_dead_lettered_total{job_type="enroll"}': 0,
            # two pool children, each loaded the models once; nothing running now
            'sum(cancelable_worker_processes{device_type="cpu"})': 2,
            'sum(cancelable_model_load_duration_seconds_count{device_type="cpu"})': 2,
            "sum(cancelable_jobs_in_flight)": 0,
            'max(cancelable_queue_length_messages{queue=~"engine.*"})': 0,
            'max(cancelable_progress_open_jobs{kind="revoke"})': 0,
            "min(cancelable_redis_up)": 1,
        }
        sums = {k if k.startswith(("sum(", "max(", "min(")) else f"sum({k})": v for k, v in expected.items()}

        def scraped_all() -> bool:
            got = {q: prom.query(q) for q in sums}
            missing = [q for q, r in got.items() if not r]
            assert not missing, f"no series yet for {missing}"
            wrong = {q: float(r[0]["value"][1]) for q, r in got.items() if float(r[0]["value"][1]) != sums[q]}
            assert not wrong, f"values differ from the jobs run: {wrong} (expected {[sums[q] for q in wrong]})"
            return True

        _wait_for(scraped_all, "Prometheus to hold the final values", timeout=60)
        stage_sum = prom.value('sum(cancelable_stage_duration_seconds_sum{stage="optimise",job_type="enroll"})')
        assert 0 < stage_sum < 240

        # Prometheus holds exactly what the workers serve (quiescent workers, one more scrape)
        time.sleep(2 * SCRAPE_S + 0.5)
        checked = 0
        served = {}
        for job, port in (("cancelable-engine", metrics_port), ("cancelable-control", control_port)):
            served[job] = _scrape(port)
            for (name, labels), val in served[job].items():
                if not name.startswith(("cancelable_jobs_total", "cancelable_stage_duration_seconds_count")):
                    continue
                sel = ",".join([f'job="{job}"', *(f'{k}="{v}"' for k, v in labels)])
                assert prom.value(f"{name}{{{sel}}}") == val, (job, name, labels)
                checked += 1
        assert checked >= 15

        # --- every dashboard and alert query -------------------------------------------------------------------
        time.sleep(3 * SCRAPE_S)  # rate() windows need two samples after the last change
        cuda = any(k[0].startswith("cancelable_gpu_") for k in served["cancelable-engine"])
        empty = []
        for where, expr in all_queries():
            q = expr.replace("$__rate_interval", "1m").replace("$job_type", ".*").replace("$instance", ".*")
            res = prom.query(q)  # must parse and evaluate
            if where.startswith("alert "):
                # An alert's condition is empty while it does not fire; what must exist is its data: every selector
                # returns a series, or (a filter that is legitimately empty in a healthy run, e.g. server-side
                # error codes) the metric exists and carries every label the filter names.
                for sel in re.findall(r"\b(?:cancelable_[a-z_]+|up)(?:\{[^}]*\})?", q):
                    if (GPU_METRIC.match(sel) and not cuda) or prom.query(sel):
                        continue
                    name = sel.split("{")[0]
                    series = prom.query(name)
                    wanted = set(re.findall(r"(\w+)\s*[=!~]+", sel[len(name) :]))
                    if not series or not all(wanted <= set(r["metric"]) for r in series):
                        empty.append(f"{where}: selector {sel}")
            elif not res and not (GPU_METRIC.search(q) and not cuda):
                empty.append(f"{where}: {q}")
        assert not empty, "queries without a series:\n" + "\n".join(empty)

        rules = prom.api("rules")["data"]["groups"]
        health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
        assert len(health) == 10 and set(health.values()) == {"ok"}, health
        firing = prom.api("alerts")["data"]["alerts"]
        assert firing == [], firing  # a healthy fleet: nothing firing or pending
        # a quantile panel really computes: enrol optimise p50 is a finite, positive duration
        p50 = prom.value(
            'histogram_quantile(0.5, sum by (le) (rate(cancelable_stage_duration_seconds_bucket{stage="optimise",'
            'job_type="enroll"}[5m])))'
        )
        assert math.isnan(p50) or p50 > 0
    finally:
        if prom is not None:
            prom.stop()
        worker.stop()
        control.stop()
        client.close()
