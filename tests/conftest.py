"""Shared test fixtures: where ../shared is, and skipping cleanly where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs ../shared (through ``shared_dir``, directly or by way of another fixture) is ``slow``:
    real photos and models cost seconds each, so ``make test-fast`` (``-m "not slow"``) leaves them to ``make test``."""
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set CANCELABLE_SHARED_DIR); real-face tests need it")
    return SHARED


@pytest.fixture(scope="session")
def smoke_faces(shared_dir: Path) -> dict[str, Path]:
    d = shared_dir / "data" / "faces-smoke" / "obama-biden"
    return {p.stem: p for p in sorted(d.glob("*.jpg"))}
