"""What the wheel ships: the product only. Builds the wheel (setuptools, offline, no build isolation) from a copy
of the package sources and reads its file list: no weights but the default bundle's, no images, no evaluation dumps,
no research code."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment")
    src = tmp_path_factory.mktemp("src")  # a copy: the build writes build/ and *.egg-info next to the sources
    shutil.copy2(REPO / "pyproject.toml", src)
    for package in ("worker", "producers"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_only_the_default_bundle_weights(wheel_files: list[str]) -> None:
    assert [f for f in wheel_files if f.endswith(".pt")] == ["worker/bundles/keymap/keymap.pt"]
    assert {f for f in wheel_files if f.startswith("worker/bundles/")} == {
        "worker/bundles/keymap/keymap.pt",
        "worker/bundles/keymap/manifest.json",
        "worker/bundles/keymap/MODEL_CARD.md",
    }


def test_no_images_dumps_or_research_code(wheel_files: list[str]) -> None:
    assert not [f for f in wheel_files if f.endswith((".png", ".jpg", ".npz", ".tflite", ".onnx"))]
    assert not [f for f in wheel_files if Path(f).name == "eval.json"]
    tops = {f.split("/", 1)[0] for f in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"worker", "producers"}
    research = ("mobilefacenet", "tflite_reader", "keymap_mfn", "measure_generator", "keymap_quick_eval")
    assert not [f for f in wheel_files if Path(f).stem in research]
    assert "worker/service/engine.py" in wheel_files and "worker/evaluation/acceptance.py" in wheel_files
