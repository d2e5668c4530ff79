"""Shared test fixtures: where ../shared is, and skipping cleanly where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports torch: MKL's default dispatch on AMD CPUs picks gemm kernels by problem size, so one
# subject's result can move by ~3e-5 with the size of its batch (measured on AMD EPYC; 2.7e-6 on Intel). The
# batching-equivalence tests check 1e-5; COMPATIBLE code paths make results independent of the batch on any x86.
# Worker subprocesses started by the integration tests inherit it. docs/notes/engine.md has the production advice.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CANCELABLE_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set CANCELABLE_SHARED_DIR); real-face tests need it")
    return SHARED


@pytest.fixture(scope="session")
def smoke_faces(shared_dir: Path) -> dict[str, Path]:
    d = shared_dir / "data" / "faces-smoke" / "obama-biden"
    return {p.stem: p for p in sorted(d.glob("*.jpg"))}
