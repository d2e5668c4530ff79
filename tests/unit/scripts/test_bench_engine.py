"""The engine benchmark's CUDA path (scripts/bench_engine.py), as far as a machine without CUDA can take it: the
measuring function on the CPU with tiny models, the device choice from the settings, and the clear skip."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_bundle

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "bench_engine.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_rates_runs_every_batch_and_precision(bench) -> None:
    rows = bench.device_rates(tiny_bundle(), torch.device("cpu"), [1, 3], [False, True], steps=1, repeats=1)
    assert [(r["mixed_precision"], r["batch"]) for r in rows] == [(False, 1), (False, 3), (True, 1), (True, 3)]
    assert all(r["images_per_s"] > 0 and r["seconds"] > 0 and r["peak_mb"] is None for r in rows)


def test_device_comes_from_the_flag_then_the_settings(bench, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANCELABLE_ENGINE__DEVICE", raising=False)
    assert bench.resolve_device(None) == torch.device("cpu")
    monkeypatch.setenv("CANCELABLE_ENGINE__DEVICE", "cuda:1")
    assert bench.resolve_device(None) == torch.device("cuda:1")
    assert bench.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("CANCELABLE_ENGINE__DEVICE", "tpu")
    with pytest.raises(ValueError, match="engine.device"):
        bench.resolve_device(None)


def test_without_cuda_the_cuda_run_is_skipped_with_its_reason(bench, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CANCELABLE_ENGINE__DEVICE", "cuda")
    monkeypatch.setattr(sys, "argv", ["bench_engine.py"])
    monkeypatch.setattr(bench, "load_models", lambda *a: pytest.fail("nothing is loaded when CUDA is missing"))
    bench.main()
    out = capsys.readouterr().out
    assert "CUDA engine benchmark SKIPPED" in out and "torch.cuda.is_available() is False" in out


def test_dry_run_prints_a_row_per_setting(bench, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "load_models", lambda bundle_dir, device: (tiny_bundle(), "tiny"))
    monkeypatch.setattr(sys, "argv", ["bench_engine.py", "--device", "cuda", "--dry-run"])
    bench.main()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mixed precision")]
    assert len(lines) == 4 and all("images/s" in ln for ln in lines)


def test_compute_floor_prints_the_floor_and_the_engine_against_it(bench, capsys) -> None:
    bench.compute_floor(tiny_bundle(), torch.device("cpu"), batch=2, repeats=1)
    out = capsys.readouterr().out
    floor = re.search(r"compute floor, batch 2: ([\d.]+) ms CPU per image-step", out)
    ratio = re.search(r"engine, batch 2, 50 steps .*: ([\d.]+) ms CPU per image-step = ([\d.]+)x the compute", out)
    assert floor and ratio, out
    assert float(floor.group(1)) > 0 and float(ratio.group(2)) > 0
