"""The module boundaries of docs/INTERFACES.md, checked on the source: every import, lazy ones (inside functions)
included, since a lazy import of boto3 in ``algorithm`` is still a dependency of ``algorithm``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
THIRD_PARTY_IO = {"celery", "kombu", "boto3", "botocore", "redis"}

# layer -> (layers of this project it may import, third-party roots it must never import)
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
            "worker.observability",
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
                if target != layer and target not in allowed and imp != "worker":
                    bad.append(f"{module} -> {imp}")
            elif imp.split(".")[0] in forbidden:
                bad.append(f"{module} -> {imp}")
    assert not bad, "imports across the documented boundaries:\n" + "\n".join(sorted(bad))


def test_the_graph_has_the_modules_it_checks() -> None:
    layers = {_layer(m) for m in MODULES}
    assert set(RULES) <= layers  # a renamed package must not make a rule vacuous


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
