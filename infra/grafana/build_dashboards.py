"""Generates the provisioned Grafana dashboards (``dashboards/*.json``) from one table of panels.

Run ``python infra/grafana/build_dashboards.py`` after editing; ``tests/unit/test_infra_lint.py`` fails when the JSON
on disk differs from what this script produces, and ``tests/integration/test_prometheus.py`` runs every query against
a real Prometheus. ``docs/operations.md`` explains each panel to operators.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SERVER_ERRORS = (
    'outcome=~"failed|dead_lettered",error_code!~"invalid_image|image_too_large|unsupported_format|no_face|'
    'multiple_faces|invalid_tensor|unknown_key|revoked_key|no_template|object_not_found|forbidden_input|invalid_input|malformed_job"'
)


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]  # (expr, legend)
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    stack: bool = False
    extra: dict = field(default_factory=dict)


def _q(expr: str) -> str:
    return " ".join(expr.split())


def fleet() -> list[tuple[str, list[Panel]]]:
    jt = 'job_type=~"$job_type"'
    return [
        (
            "Throughput and errors",
            [
                Panel(
                    "Jobs finished per second",
                    "Finished jobs per second by job type (all outcomes). The fleet's throughput.",
                    [(f"sum by (job_type) (rate(cancelable_jobs_total{{{jt}}}[$__rate_interval]))", "{{job_type}}")],
                    unit="ops",
                    stack=True,
                ),
                Panel(
                    "Images per second",
                    "Input images processed per second, succeeded vs rejected.",
                    [(f"sum by (outcome) (rate(cancelable_images_total{{{jt}}}[$__rate_interval]))", "{{outcome}}")],
                    unit="ops",
                    stack=True,
                ),
                Panel(
                    "Server error ratio",
                    "Share of jobs that failed or were dead-lettered with a server-side code (rejected inputs "
                    "excluded). The CancelableErrorRateHigh alert fires above 5% for 10 minutes.",
                    [
                        (
                            # "or ... * 0": show 0 % rather than "No data" while there are no server errors
                            f"(sum by (job_type) (rate(cancelable_jobs_total{{{jt},{SERVER_ERRORS}}}"
                            "[$__rate_interval]))"
                            f" or sum by (job_type) (rate(cancelable_jobs_total{{{jt}}}[$__rate_interval])) * 0)"
                            f" / sum by (job_type) (rate(cancelable_jobs_total{{{jt}}}[$__rate_interval]))",
                            "{{job_type}}",
                        )
                    ],
                    unit="percentunit",
                    extra={"max": 1},
                ),
                Panel(
                    "Failures by error code",
                    "Failed and dead-lettered jobs per second by error code: names the cause of an error spike "
                    "(no_face / invalid_image = callers' inputs; storage_error / key_provider_unavailable = "
                    "infrastructure).",
                    [
                        (
                            f"sum by (error_code) (rate(cancelable_jobs_total"
                            f'{{{jt},outcome=~"failed|dead_lettered"}}[$__rate_interval]))',
                            "{{error_code}}",
                        )
                    ],
                    unit="ops",
                    stack=True,
                ),
            ],
        ),
        (
            "Queues",
            [
                Panel(
                    "Queue depth",
                    "Messages waiting in each Celery queue (not yet picked up). KEDA scales engine workers on it.",
                    [("max by (queue) (cancelable_queue_length_messages)", "{{queue}}")],
                    unit="short",
                    width=8,
                ),
                Panel(
                    "Oldest message age",
                    "How long the oldest waiting message has waited. SLO: 5 minutes (CancelableQueueAgeOverSLO).",
                    [("max by (queue) (cancelable_queue_oldest_message_age_seconds)", "{{queue}}")],
                    unit="s",
                    width=8,
                    extra={"thresholds": 300},
                ),
                Panel(
                    "Jobs in flight",
                    "Jobs executing right now in live worker processes.",
                    [(f"sum by (job_type) (cancelable_jobs_in_flight{{{jt}}})", "{{job_type}}")],
                    unit="short",
                    width=8,
                    stack=True,
                ),
                Panel(
                    "Retries and dead letters",
                    "Retries scheduled for transient errors, and jobs given up (dead-lettered), per minute.",
                    [
                        (
                            f"sum by (job_type) (rate(cancelable_task_retries_total{{{jt}}}[$__rate_interval])) * 60",
                            "retries {{job_type}}",
                        ),
                        (
                            f"sum by (job_type) (rate(cancelable_jobs_dead_lettered_total{{{jt}}}"
                            "[$__rate_interval])) * 60",
                            "dead-lettered {{job_type}}",
                        ),
                    ],
                    unit="short",
                    width=24,
                ),
            ],
        ),
        (
            "Latency",
            [
                *[
                    Panel(
                        f"Stage latency p{q}",
                        f"{q}th percentile wall time of each pipeline stage (download, decode, align, "
                        f"optimise, template, upload, key).",
                        [
                            (
                                f"histogram_quantile(0.{q}, sum by (le, stage) "
                                f"(rate(cancelable_stage_duration_seconds_bucket{{{jt}}}[$__rate_interval])))",
                                "{{stage}}",
                            )
                        ],
                        unit="s",
                        width=8,
                    )
                    for q in ("50", "95", "99")
                ],
                Panel(
                    "Job duration p50 / p95 / p99",
                    "End-to-end attempt time per job type.",
                    [
                        (
                            f"histogram_quantile(0.{q}, sum by (le, job_type) "
                            f"(rate(cancelable_job_duration_seconds_bucket{{{jt}}}[$__rate_interval])))",
                            f"p{q} {{{{job_type}}}}",
                        )
                        for q in ("50", "95", "99")
                    ],
                    unit="s",
                ),
                Panel(
                    "Batch size and optimisation steps",
                    "Average faces per batched engine call and average optimisation steps per run.",
                    [
                        (
                            f"sum by (job_type) (rate(cancelable_batch_size_images_sum{{{jt}}}[$__rate_interval]))"
                            f" / sum by (job_type) (rate(cancelable_batch_size_images_count{{{jt}}}"
                            "[$__rate_interval]))",
                            "faces/batch {{job_type}}",
                        ),
                        (
                            f"sum by (job_type) (rate(cancelable_optimisation_run_steps_sum{{{jt}}}[$__rate_interval]))"
                            f" / sum by (job_type) (rate(cancelable_optimisation_run_steps_count{{{jt}}}"
                            "[$__rate_interval]))",
                            "steps/run {{job_type}}",
                        ),
                    ],
                    unit="short",
                ),
            ],
        ),
        (
            "GPU",
            [
                Panel(
                    "GPU memory reserved / total",
                    "Memory held by the CUDA caching allocator as a share of the GPU (CancelableGPUMemoryNearFull "
                    "above 90%).",
                    [
                        (
                            "max by (instance, gpu) (cancelable_gpu_memory_reserved_bytes)"
                            " / max by (instance, gpu) (cancelable_gpu_memory_total_bytes)",
                            "{{instance}} gpu{{gpu}}",
                        )
                    ],
                    unit="percentunit",
                    width=8,
                    extra={"max": 1, "thresholds": 0.9},
                ),
                Panel(
                    "GPU memory allocated",
                    "Memory held by live tensors, per GPU.",
                    [("sum by (instance, gpu) (cancelable_gpu_memory_allocated_bytes)", "{{instance}} gpu{{gpu}}")],
                    unit="bytes",
                    width=8,
                ),
                Panel(
                    "GPU utilisation",
                    "Fraction of time the GPU was busy (NVML). Low with a deep queue means CPU-bound stages.",
                    [("max by (instance, gpu) (cancelable_gpu_utilisation_ratio)", "{{instance}} gpu{{gpu}}")],
                    unit="percentunit",
                    width=8,
                    extra={"max": 1},
                ),
            ],
        ),
    ]


def fanout() -> list[tuple[str, list[Panel]]]:
    return [
        (
            "Revocation and bulk progress",
            [
                Panel(
                    "Open jobs",
                    "Revocation and bulk jobs not yet finalised.",
                    [("max by (kind) (cancelable_progress_open_jobs)", "{{kind}}")],
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Done",
                    "Items finished (succeeded + failed) over items expected, summed over open jobs.",
                    [
                        (
                            "max by (kind) (cancelable_progress_done_items)"
                            " / clamp_min(max by (kind) (cancelable_progress_total_items), 1)",
                            "{{kind}}",
                        )
                    ],
                    kind="gauge",
                    unit="percentunit",
                    width=6,
                    extra={"max": 1},
                ),
                Panel(
                    "Items remaining",
                    "Items still to process over all open jobs. Flat while non-zero = stalled "
                    "(CancelableRevocationStalled after 15 min).",
                    [
                        (
                            "max by (kind) (cancelable_progress_total_items - cancelable_progress_done_items)",
                            "{{kind}}",
                        )
                    ],
                    width=12,
                ),
                Panel(
                    "Items completed per second",
                    "Fan-out items completed per second by outcome (the slope of the progress).",
                    [
                        (
                            "sum by (kind, outcome) (rate(cancelable_fanout_items_total[$__rate_interval]))",
                            "{{kind}} {{outcome}}",
                        )
                    ],
                    unit="ops",
                    width=12,
                    stack=True,
                ),
                Panel(
                    "Failed items",
                    "Items that failed within open jobs (their error codes are in `cancelable status <job>`).",
                    [("max by (kind) (cancelable_progress_failed_items)", "{{kind}}")],
                    width=12,
                ),
                Panel(
                    "Re-enrolment and bulk job latency p95",
                    "95th percentile duration of revoke, re-enrol and bulk tasks.",
                    [
                        (
                            "histogram_quantile(0.95, sum by (le, job_type) "
                            "(rate(cancelable_job_duration_seconds_bucket"
                            '{job_type=~"revoke|reenroll|bulk"}[$__rate_interval])))',
                            "{{job_type}}",
                        )
                    ],
                    unit="s",
                    width=12,
                ),
                Panel(
                    "Engine queue during fan-out",
                    "Engine and control queue depth: a revocation or bulk job fans out onto these.",
                    [("max by (queue) (cancelable_queue_length_messages)", "{{queue}}")],
                    width=24,
                ),
            ],
        )
    ]


def per_worker() -> list[tuple[str, list[Panel]]]:
    inst = 'instance=~"$instance"'
    return [
        (
            "Worker $instance",
            [
                Panel(
                    "Up",
                    "1 when Prometheus can scrape the worker's metrics endpoint.",
                    [(f'up{{job=~"cancelable-.*",{inst}}}', "{{instance}}")],
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Live worker processes",
                    "Pool processes with models loaded (one per GPU on GPU nodes).",
                    [(f"sum by (instance, device_type) (cancelable_worker_processes{{{inst}}})", "{{device_type}}")],
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Model load time",
                    "Average time to load and verify the model bundle in a process (cold start cost).",
                    [
                        (
                            f"sum by (instance) (cancelable_model_load_duration_seconds_sum{{{inst}}})"
                            f" / sum by (instance) (cancelable_model_load_duration_seconds_count{{{inst}}})",
                            "{{instance}}",
                        )
                    ],
                    kind="stat",
                    unit="s",
                    width=6,
                ),
                Panel(
                    "In flight",
                    "Jobs executing on this worker.",
                    [(f"sum by (instance) (cancelable_jobs_in_flight{{{inst}}})", "{{instance}}")],
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Jobs per second by outcome",
                    "This worker's finished jobs per second.",
                    [
                        (
                            f"sum by (instance, outcome) (rate(cancelable_jobs_total{{{inst}}}[$__rate_interval]))",
                            "{{instance}} {{outcome}}",
                        )
                    ],
                    unit="ops",
                ),
                Panel(
                    "Stage latency p95",
                    "95th percentile per stage on this worker; compare with the fleet to spot a slow node.",
                    [
                        (
                            "histogram_quantile(0.95, sum by (le, instance, stage) "
                            f"(rate(cancelable_stage_duration_seconds_bucket{{{inst}}}[$__rate_interval])))",
                            "{{instance}} {{stage}}",
                        )
                    ],
                    unit="s",
                ),
                Panel(
                    "GPU memory",
                    "Allocated and reserved CUDA memory per GPU of this worker.",
                    [
                        (
                            f"sum by (instance, gpu) (cancelable_gpu_memory_allocated_bytes{{{inst}}})",
                            "allocated gpu{{gpu}}",
                        ),
                        (
                            f"sum by (instance, gpu) (cancelable_gpu_memory_reserved_bytes{{{inst}}})",
                            "reserved gpu{{gpu}}",
                        ),
                    ],
                    unit="bytes",
                ),
                Panel(
                    "GPU utilisation",
                    "Busy fraction per GPU of this worker.",
                    [(f"max by (instance, gpu) (cancelable_gpu_utilisation_ratio{{{inst}}})", "gpu{{gpu}}")],
                    unit="percentunit",
                    extra={"max": 1},
                ),
            ],
        )
    ]


def _variable(name: str, query: str, label: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": p.unit}
    if "max" in p.extra:
        defaults["max"] = p.extra["max"]
        defaults["min"] = 0
    if "thresholds" in p.extra:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": p.extra["thresholds"]}],
        }
    if p.kind == "timeseries":
        defaults["custom"] = {"stacking": {"mode": "normal" if p.stack else "none"}, "fillOpacity": 10}
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
        if p.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": [
            {"datasource": DATASOURCE, "expr": _q(expr), "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def dashboard(uid: str, title: str, rows: list[tuple[str, list[Panel]]], variables: list[dict]) -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row_panels in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        pid, y, x, row_h = pid + 1, y + 1, 0, 0
        for p in row_panels:
            if x + p.width > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, row_h = pid + 1, x + p.width, max(row_h, p.height)
        y += row_h
    return {
        "uid": uid,
        "title": title,
        "tags": ["cancelable"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [{"title": "Cancelable dashboards", "type": "dashboards", "tags": ["cancelable"], "asDropdown": True}],
        "panels": panels,
    }


def build() -> dict[str, dict]:
    return {
        "fleet-overview.json": dashboard(
            "cancelable-fleet",
            "Cancelable / Fleet overview",
            fleet(),
            [_variable("job_type", "label_values(cancelable_jobs_total, job_type)", "Job type")],
        ),
        "revocation-bulk.json": dashboard("cancelable-fanout", "Cancelable / Revocation & bulk progress", fanout(), []),
        "per-worker.json": dashboard(
            "cancelable-worker",
            "Cancelable / Worker",
            per_worker(),
            [_variable("instance", 'label_values(up{job=~"cancelable-.*"}, instance)', "Worker")],
        ),
    }


def render(d: dict) -> str:
    return json.dumps(d, indent=2, sort_keys=False) + "\n"


DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
BEGIN, END = "<!-- panels:begin (generated by infra/grafana/build_dashboards.py) -->", "<!-- panels:end -->"


def panel_reference() -> str:
    """Markdown: every dashboard, row and panel with its queries and what an operator reads from it."""
    lines = [BEGIN, ""]
    for name, d in build().items():
        lines += [f"### {d['title']}", "", f"`infra/grafana/dashboards/{name}` (uid `{d['uid']}`)", ""]
        variables = [v["name"] for v in d["templating"]["list"]]
        if variables:
            lines += ["Variables: " + ", ".join(f"`${v}`" for v in variables) + ".", ""]
        for p in d["panels"]:
            if p["type"] == "row":
                lines += [f"#### {p['title']}", ""]
                continue
            unit = p["fieldConfig"]["defaults"].get("unit", "")
            lines += [f"- **{p['title']}** ({p['type']}, unit `{unit}`): {p['description']}"]
            for t in p["targets"]:
                lines += [f"  - `{t['expr']}`" + (f" (legend `{t['legendFormat']}`)" if t["legendFormat"] else "")]
        lines.append("")
    return "\n".join([*lines, END])


def render_docs(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + panel_reference() + tail


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, d in build().items():
        (OUT / name).write_text(render(d))
        print(f"wrote {OUT / name} ({sum(1 for p in d['panels'] if p['type'] != 'row')} panels)")
    if DOCS.is_file() and BEGIN in DOCS.read_text():
        DOCS.write_text(render_docs(DOCS.read_text()))
        print(f"updated the panel reference in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
