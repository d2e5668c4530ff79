"""Fixtures of the service unit tests: a ``FakeRuntime`` (in-memory S3 and Redis, a local keyring, the tiny engine)
per test, and a ``FakeDispatch``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tiny_models.py

from service_fakes import FakeDispatch, FakeRuntime, make_runtime, tiny_loaded_engine

from worker.service.engine import LoadedEngine


@pytest.fixture(scope="session")
def loaded() -> LoadedEngine:
    import torch

    torch.set_num_threads(1)
    engine = tiny_loaded_engine()
    engine.engine.enroll_many([(torch.zeros(1, 3, 16, 16), bytes(32))])  # torch's one-time warm-up, not a test's
    return engine


@pytest.fixture
def rt(tmp_path: Path, loaded: LoadedEngine) -> FakeRuntime:
    return make_runtime(tmp_path, loaded, revoke_chunk_size=2)


@pytest.fixture
def dispatch() -> FakeDispatch:
    return FakeDispatch()
