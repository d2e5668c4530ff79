"""The one place that turns a bundle's manifest plus a deployment's engine settings into what the engine runs with.

A manifest may carry an ``engine`` section: advice from whoever built the bundle (layer split, key target center,
steps, ``verify_threshold``, ...). A deployment's explicit setting wins over the advice; the advice wins over the
settings' defaults. The manifest is read and checked by ``worker.models.bundle.read_manifest``. Workers
(``worker.service.engine``), ``cancelable-eval`` and ``cancelable-bundle`` all call these functions, so they evaluate
and calibrate exactly what a worker deploys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.algorithm.config import EngineConfig
from worker.errors import BundleError, UncalibratedFarError
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


def matcher_of(manifest: dict[str, Any]) -> str:
    """How verify scores are computed: the calibrated ``verify.matcher`` when the manifest has one, else
    ``default_matcher``. A template records it; verify refuses a template whose matcher differs from the bundle's."""
    verify = manifest.get("verify")
    if isinstance(verify, dict) and isinstance(verify.get("matcher"), str):
        return str(verify["matcher"])
    return default_matcher(manifest)


def default_matcher(manifest: dict[str, Any]) -> str:
    """The matcher a bundle's engine scores with: ``<identity component format>:<its sha256, 12 hex>:<kind>``, kind
    ``keymap-whitened`` (cosine in the key map's whitened generator coordinates) for a ``keymap-mlp`` encoder,
    else ``cosine`` (of the raw embeddings). What ``calibrate-threshold`` writes."""

    def component(role: str) -> dict[str, Any]:
        components = manifest.get("components")
        found = components.get(role) if isinstance(components, dict) else None
        return found if isinstance(found, dict) else {}

    identity, encoder = component("identity"), component("encoder")
    kind = "keymap-whitened" if encoder.get("format") == "keymap-mlp" else "cosine"
    return f"{identity.get('format', 'unknown')}:{str(identity.get('sha256', ''))[:12]}:{kind}"


def check_matcher(matcher: str, engine_kind: str) -> None:
    """Refuse a manifest whose verify calibration was made for another way of scoring than the engine's (its
    thresholds would mean nothing): BundleError."""
    if matcher.rsplit(":", 1)[-1] != engine_kind:
        raise BundleError(
            f"the bundle's verify section is calibrated for matcher {matcher}, but its engine scores with "
            f"{engine_kind}: recalibrate (cancelable-bundle calibrate-threshold --write)"
        )


def calibration_mismatch(manifest: dict[str, Any], fingerprint: str) -> str | None:
    """A warning when the manifest's verify thresholds were calibrated for another engine configuration than the one
    built (``CANCELABLE_ENGINE__STEPS`` overridden, say): the false-accept rates they state do not hold for it.
    None when they match or the calibration does not record its engine."""
    calibration = manifest.get("calibration")
    verify = calibration.get("verify") if isinstance(calibration, dict) else None
    made_for = verify.get("engine_fingerprint") if isinstance(verify, dict) else None
    if not isinstance(made_for, str) or made_for == fingerprint:
        return None
    return (
        f"verify thresholds were calibrated for engine {made_for}, this worker runs {fingerprint}: the false-accept "
        "rates they state are not measured for it (recalibrate: cancelable-bundle calibrate-threshold --write)"
    )


def size_key(enrolment_size: int | None) -> str | None:
    """Enrolment size -> the calibration's key: "1", "2" or "3+" (None when unknown)."""
    if enrolment_size is None or enrolment_size < 1:
        return None
    return "3+" if enrolment_size >= 3 else str(enrolment_size)


@dataclass(frozen=True)
class Decision:
    """The threshold a verify uses and the false-accept rate it stands for (measured among different people's
    cancelable faces under one key at calibration; None where the calibration does not cover it)."""

    threshold: float
    far: float | None
    far_ci95: tuple[float, float] | None


@dataclass(frozen=True)
class VerifyPolicy:
    """How verify turns a score into a decision: the bundle's calibration (``manifest["verify"]``, written by
    ``cancelable-bundle calibrate-threshold``) and the deployment's threshold."""

    matcher: str
    default_threshold: float  # engine.verify_threshold: explicit setting, else the bundle's advice
    explicit: bool  # the deployment set engine.verify_threshold: it wins over the per-size thresholds
    thresholds: dict[str, float]  # enrolment size key -> threshold at the calibration's target FAR
    points: dict[str, list[dict[str, Any]]]  # enrolment size key -> operating points

    def _points(self, enrolment_size: int | None) -> list[dict[str, Any]]:
        key = size_key(enrolment_size)
        return self.points.get(key, []) if key is not None else []

    def far_at(self, threshold: float, enrolment_size: int | None) -> Decision:
        """The FAR a threshold stands for: that of the calibrated operating point with the highest threshold at or
        below it (an upper bound, as accepting fewer scores never raises the FAR)."""
        below = [p for p in self._points(enrolment_size) if p["threshold"] <= threshold]
        if not below:
            return Decision(threshold, None, None)
        p = max(below, key=lambda q: q["threshold"])
        return Decision(threshold, float(p["far"]), (float(p["far_ci95"][0]), float(p["far_ci95"][1])))

    def decide(self, enrolment_size: int | None, threshold: float | None = None, far: float | None = None) -> Decision:
        """The decision rule of one verify: an explicit ``threshold``, else the calibrated threshold for the target
        ``far``, else the deployment's threshold, else the bundle's threshold for the enrolment size.

        Raises UncalibratedFarError when ``far`` is below every FAR the calibration resolved for this size."""
        if threshold is not None and far is not None:
            raise ValueError("give a threshold or a false-accept rate, not both")
        if far is not None:
            usable = [p for p in self._points(enrolment_size) if p["far_target"] <= far and p.get("resolved", True)]
            if not usable:
                size = size_key(enrolment_size) or "unknown"
                raise UncalibratedFarError(
                    f"the bundle holds no calibrated threshold at false-accept rate {far:g} for enrolment size {size} "
                    "(calibrate with more impostor trials, or pass a threshold)"
                )
            p = max(usable, key=lambda q: q["far_target"])
            return Decision(float(p["threshold"]), float(p["far"]), (float(p["far_ci95"][0]), float(p["far_ci95"][1])))
        if threshold is None:
            key = size_key(enrolment_size)
            if self.explicit or key is None or key not in self.thresholds:
                threshold = self.default_threshold
            else:
                threshold = self.thresholds[key]
        return self.far_at(threshold, enrolment_size)


def verify_policy(manifest: dict[str, Any], engine: EngineSettings) -> VerifyPolicy:
    """The verify decision rule for a bundle's manifest under a deployment's settings."""
    section = manifest.get("verify")
    section = section if isinstance(section, dict) else {}
    thresholds = section.get("thresholds")
    points = section.get("operating_points")
    return VerifyPolicy(
        matcher=matcher_of(manifest),
        default_threshold=verify_threshold(manifest, engine),
        explicit="verify_threshold" in engine.model_fields_set,
        thresholds={str(k): float(v) for k, v in thresholds.items()} if isinstance(thresholds, dict) else {},
        points={str(k): list(v) for k, v in points.items()} if isinstance(points, dict) else {},
    )
