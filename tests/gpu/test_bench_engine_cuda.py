"""The engine benchmark's CUDA path on a GPU (skipped without CUDA): both precision settings run, the device is
synchronised, peak memory is reported."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tiny_models import tiny_bundle

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine.py"


def test_device_rates_on_cuda() -> None:
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    device = torch.device("cuda")
    assert bench.cuda_unavailable_reason(device) is None
    rows = bench.device_rates(tiny_bundle(), device, [1, 2], [False, True], steps=2, repeats=1)
    assert [(r["mixed_precision"], r["batch"]) for r in rows] == [(False, 1), (False, 2), (True, 1), (True, 2)]
    assert all(r["images_per_s"] > 0 and r["peak_mb"] > 0 for r in rows)
