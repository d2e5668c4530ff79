"""The module boundaries of docs/INTERFACES.md, checked on the source: every import, lazy ones (inside functions)
included, since a lazy import of boto3 in ``algorithm`` is still a dependency of ``algorithm``. The layer table of
docs/INTERFACES.md states the same rules as ``RULES`` (``test_interfaces_md_states_these_rules``)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THIRD_PARTY_IO = {"celery", "kombu", "boto3", "botocore", "redis"}

# layer -> (what of this project it may import, third-party roots it must never import). An allowed entry is a layer
# (``worker.storage``: any module in it) or one module of a layer (``worker.observability.redaction``: only that one).
RULES: dict[str, tuple[set[str], set[str]]] = {
    "worker.errors": (set(), THIRD_PARTY_IO | {"torch"}),
    "worker.contracts": ({"worker.contracts", "worker.errors"}, THIRD_PARTY_IO | {"torch", "numpy"}),
    "worker.settings": ({"worker.contracts", "worker.errors"}, THIRD_PARTY_IO | {"torch"}),
    "worker.models": ({"worker.models", "worker.errors"}, THIRD_PARTY_IO),
    "worker.algorithm": ({"worker.algorithm", "worker.models", "worker.errors"}, THIRD_PARTY_IO),
    "worker.keys": (
        {
            "worker.keys",
            "worker.contracts",
            "worker.errors",
            "worker.storage",
            "worker.settings",
            "worker.observability.redaction",  # the one redaction filter, for botocore's loggers
        },
        {"torch", "celery", "kombu"},
    ),
    "worker.storage": ({"worker.storage", "worker.contracts", "worker.errors", "worker.settings"}, {"torch", "celery"}),
    # the business logic: plain typed functions over a runtime protocol; no Celery, no broker, no Redis client
    "worker.service": (
        {
            "worker.service",
            "worker.contracts",
            "worker.errors",
            "worker.settings",
            "worker.storage",
            "worker.keys",
            "worker.algorithm",
            "worker.models",
            "worker.metrics",
            "worker.bundle_config",
        },
        {"celery", "kombu", "redis", "boto3", "botocore"},
    ),
    # queue and task names, the Celery config and pipelined publishing: what producers and workers share
    "worker.broker": (
        {"worker.broker", "worker.contracts", "worker.errors", "worker.settings", "worker.storage"},
        {"torch"},
    ),
    "worker.evaluation": (
        {
            "worker.evaluation",
            "worker.bundle_config",
            "worker.algorithm",
            "worker.models",
            "worker.keys",
            "worker.service",
            "worker.contracts",
            "worker.errors",
            "worker.settings",
            "worker.storage",
        },
        {"celery", "kombu"},
    ),
    "producers": (
        # worker.keys: `cancelable keys` manages the local keyring and reads key state (never derives seeds)
        {
            "producers",
            "worker.contracts",
            "worker.errors",
            "worker.settings",
            "worker.storage",
            "worker.broker",
            "worker.keys",
        },
        {"torch"},
    ),
    # engine configs from a bundle's manifest advice and the settings: shared by workers, evaluation and bundletool
    "worker.bundle_config": (
        {"worker.bundle_config", "worker.algorithm", "worker.models", "worker.settings", "worker.errors"},
        THIRD_PARTY_IO,
    ),
    # operator commands that change a bundle's manifest: no broker, no queues
    "worker.bundletool": (
        {
            "worker.bundletool",
            "worker.bundle_config",
            "worker.algorithm",
            "worker.models",
            "worker.keys",
            "worker.service",
            "worker.contracts",
            "worker.errors",
            "worker.settings",
            "worker.evaluation.splits",
        },
        {"celery", "kombu", "redis"},
    ),
    # thin Celery tasks over the service, the app and its per-process runtime: S3 only through storage
    "worker.tasks": (
        {
            "worker.tasks",
            "worker.service",
            "worker.broker",
            "worker.contracts",
            "worker.errors",
            "worker.settings",
            "worker.storage",
            "worker.keys",
            "worker.metrics",
            "worker.observability",
        },
        {"boto3", "botocore"},
    ),
    # Prometheus metrics: queue names from the broker config; torch only read from sys.modules, never imported
    "worker.metrics": ({"worker.metrics", "worker.broker", "worker.errors"}, {"torch", "kombu", "boto3", "botocore"}),
    # redaction, job scope, Sentry and logging: below everything that logs
    "worker.observability": (
        {"worker.observability", "worker.errors"},
        {"torch", "kombu", "redis", "boto3", "botocore"},
    ),
}


def _modules() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in [*REPO.glob("worker/**/*.py"), *REPO.glob("producers/**/*.py")]:
        name = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        imports: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                imports.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imports.add(node.module)
                imports.update(f"{node.module}.{a.name}" for a in node.names if node.module in ("worker",))
        out[name] = imports
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "worker" and len(parts) > 1 else parts[0]


MODULES = _modules()


def _allowed(imp: str, layer: str, allowed: set[str]) -> bool:
    target = _layer(imp)
    return imp == "worker" or target == layer or any(imp == a or imp.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_interfaces_md_allows(layer: str) -> None:
    allowed, forbidden = RULES[layer]
    bad = []
    for module, imports in MODULES.items():
        if _layer(module) != layer:
            continue
        for imp in imports:
            target = _layer(imp)
            if target in ("worker", "producers") or target.startswith("worker."):
                if not _allowed(imp, layer, allowed):
                    bad.append(f"{module} -> {imp}")
            elif imp.split(".")[0] in forbidden:
                bad.append(f"{module} -> {imp}")
    assert not bad, "imports across the documented boundaries:\n" + "\n".join(sorted(bad))


def test_module_rules_allow_only_that_module() -> None:
    """``worker.keys`` may import the redaction module, not the rest of ``worker.observability``."""
    allowed = RULES["worker.keys"][0]
    assert _allowed("worker.observability.redaction", "worker.keys", allowed)
    assert not _allowed("worker.observability", "worker.keys", allowed)
    assert not _allowed("worker.observability.sentry", "worker.keys", allowed)
    assert not _allowed("worker.observability.redactions", "worker.keys", allowed)


def test_every_layer_has_a_rule() -> None:
    layers = {_layer(m) for m in MODULES}
    assert set(RULES) <= layers  # a renamed package must not make a rule vacuous
    assert layers - {"worker"} <= set(RULES), "a package or module without a rule: add it here and to INTERFACES.md"


# --- docs/INTERFACES.md's layer table ------------------------------------------------------------------------------
TABLE_HEADER = "| layer | may import (this project) | never imports |"


def _names(cell: str) -> set[str]:
    """``keys, storage (a remark, with commas), nothing`` -> {"keys", "storage"}: parenthesised remarks dropped."""
    prev = None
    while prev != cell:
        prev, cell = cell, re.sub(r"\([^()]*\)", "", cell)
    names = {n.strip().strip("`") for n in cell.split(",")}
    return {n for n in names if n and n not in ("nothing", "-")}


def _project(name: str) -> str:
    return name if name == "producers" or name.startswith("worker") else f"worker.{name}"


def interfaces_table(text: str) -> dict[str, tuple[set[str], set[str]]]:
    """The layer table of INTERFACES.md as ``RULES``: layer -> (allowed, forbidden), a layer's own name dropped."""
    lines = text.splitlines()
    start = lines.index(TABLE_HEADER) + 2  # header and separator
    table: dict[str, tuple[set[str], set[str]]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"INTERFACES.md layer table row with {len(cells)} cells: {line}"
        for layer in sorted(_names(cells[0])):
            assert layer not in table, f"INTERFACES.md lists {layer} twice"
            allowed = {_project(n) for n in _names(cells[1])} - {layer}
            table[layer] = (allowed, _names(cells[2]))
    return table


def test_interfaces_md_states_these_rules() -> None:
    table = interfaces_table((REPO / "docs" / "INTERFACES.md").read_text())
    rules = {layer: (allowed - {layer}, forbidden) for layer, (allowed, forbidden) in RULES.items()}
    assert set(table) == set(rules), "layers in INTERFACES.md's table and in RULES differ"
    for layer, (allowed, forbidden) in rules.items():
        assert table[layer][0] == allowed, (
            f"{layer}: INTERFACES.md may-import {sorted(table[layer][0])} != {sorted(allowed)}"
        )
        assert table[layer][1] == forbidden, (
            f"{layer}: INTERFACES.md never-imports {sorted(table[layer][1])} != {sorted(forbidden)}"
        )


def test_the_table_parser_reads_remarks_and_lists() -> None:
    text = "\n".join(
        [
            TABLE_HEADER,
            "|---|---|---|",
            "| `worker.a`, `worker.b` | a, errors (remark, (nested), with commas), c.mod | x, y |",
            "| `producers` | nothing | - |",
            "",
            "| `worker.z` | z | q |",
        ]
    )
    assert interfaces_table(text) == {
        "worker.a": ({"worker.errors", "worker.c.mod"}, {"x", "y"}),
        "worker.b": ({"worker.a", "worker.errors", "worker.c.mod"}, {"x", "y"}),
        "producers": (set(), set()),
    }


def test_the_service_loads_without_celery_redis_or_torch() -> None:
    """The business logic can be imported (and run, with a runtime of one's own) without Celery, a Redis client or
    torch: the static rules above also hold for what those modules pull in."""
    mods = ["enrol", "verify", "reissue", "revoke", "bulk", "fanout", "engine", "runtime"]
    code = (
        f"import sys\nfor m in {mods!r}: __import__('worker.service.' + m)\n"
        "print(sorted(m for m in ('celery', 'kombu', 'redis', 'torch', 'boto3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
