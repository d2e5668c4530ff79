"""``cancelable-eval run`` judges the engine configuration a worker deploys for the bundle, not a hard-coded one."""

from __future__ import annotations

import json
from pathlib import Path

from worker.bundle_config import deployed_config
from worker.evaluation.cli import build_parser


def _bundle(tmp_path: Path, engine: dict) -> Path:
    (tmp_path / "manifest.json").write_text(
        json.dumps({"bundle_id": "b", "schema_version": 1, "components": {}, "engine": engine})
    )
    return tmp_path


def test_bundle_advice_is_applied(tmp_path: Path) -> None:
    center = [0.6, 0.8] + [0.0] * 126
    cfg = deployed_config(_bundle(tmp_path, {"split": "readme", "key_target_center": center, "w_key": 3.0}), None, None)
    assert cfg.split == "readme" and cfg.key_target is True and cfg.w_key == 3.0
    assert cfg.key_target_center == tuple(center) and cfg.steps == 50


def test_explicit_overrides_win(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, {"split": "readme", "steps": 80})
    cfg = deployed_config(bundle, 7, False)
    assert cfg.steps == 7 and cfg.key_target is False and cfg.split == "readme"
    assert deployed_config(bundle, None, None).steps == 80  # without an explicit value the advice applies


def test_key_target_flag_is_tri_state() -> None:
    p = build_parser()
    assert p.parse_args(["run"]).key_target is None
    assert p.parse_args(["run", "--key-target"]).key_target is True
    assert p.parse_args(["run", "--no-key-target"]).key_target is False
