"""The one place that turns a bundle's manifest plus a deployment's engine settings into what the engine runs with.

A manifest may carry an ``engine`` section: advice from whoever built the bundle (layer split, key target center,
steps, ``verify_threshold``, ...). A deployment's explicit setting wins over the advice; the advice wins over the
settings' defaults. The manifest is read and checked by ``worker.models.bundle.read_manifest``. Workers
(``worker.tasks.runtime``), ``cancelable-eval`` and ``cancelable-bundle`` all call these functions, so they evaluate
and calibrate exactly what a worker deploys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from worker.algorithm.config import EngineConfig
from worker.models.bundle import read_manifest
from worker.settings import EngineSettings

# settings field -> EngineConfig field, for the settings a deployment may set over the bundle's advice
_SETTINGS_TO_CONFIG = (("steps", "steps"), ("mixed_precision", "mixed_precision"), ("batch_size", "max_batch_images"))


def _advice(manifest: dict[str, Any]) -> dict[str, Any]:
    engine = manifest.get("engine")
    return engine if isinstance(engine, dict) else {}


def engine_config(manifest: dict[str, Any], engine: EngineSettings) -> EngineConfig:
    """The bundle's advice (fields ``EngineConfig`` knows) with the deployment's explicit settings on top."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    kw: dict[str, Any] = {k: v for k, v in _advice(manifest).items() if k in known}
    if isinstance(kw.get("lr_milestones"), list):
        kw["lr_milestones"] = tuple(kw["lr_milestones"])
    explicit = engine.model_fields_set
    for ours, theirs in _SETTINGS_TO_CONFIG:
        if ours in explicit or theirs not in kw:
            kw[theirs] = getattr(engine, ours)
    return EngineConfig(**kw)


def verify_threshold(manifest: dict[str, Any], engine: EngineSettings) -> float:
    """The deployment's ``verify_threshold`` when set explicitly, else the bundle's advice, else the default."""
    advised = _advice(manifest).get("verify_threshold")
    if "verify_threshold" not in engine.model_fields_set and isinstance(advised, int | float):
        if -1.0 <= float(advised) <= 1.0:
            return float(advised)
    return float(engine.verify_threshold)


def deployed_config(bundle_dir: Path, steps: int | None = None, key_target: bool | None = None) -> EngineConfig:
    """The EngineConfig a worker with default settings builds for the bundle in ``bundle_dir``, with explicit
    overrides on top (``steps`` as ``CANCELABLE_ENGINE__STEPS`` would; ``key_target`` forced on or off)."""
    engine = EngineSettings() if steps is None else EngineSettings(steps=steps)
    config = engine_config(read_manifest(bundle_dir), engine)
    return config if key_target is None else dataclasses.replace(config, key_target=key_target)
