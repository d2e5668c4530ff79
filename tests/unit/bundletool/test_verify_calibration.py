"""Verify calibration: operating points and their FAR interval, per-enrolment-size decisions, the manifest section
``cancelable-bundle calibrate-threshold`` writes, and the trials it scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from worker.bundle_config import (
    VerifyPolicy,
    calibration_mismatch,
    check_matcher,
    default_matcher,
    matcher_of,
    size_key,
    verify_policy,
)
from worker.bundletool.calibrate import calibrate_sizes, decision_rates, trials, verify_section
from worker.bundletool.operating_points import clopper_pearson, operating_point, rounded_threshold_at_far
from worker.errors import BundleError, UncalibratedFarError
from worker.settings import EngineSettings


def test_threshold_at_far_admits_at_most_the_allowed_impostors() -> None:
    imp = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    t = rounded_threshold_at_far(imp, 0.05)
    assert sum(s >= t for s in imp) == 5 and t == 0.9401  # just above the 6th highest
    assert (
        sum(s >= rounded_threshold_at_far(imp, 0.001) for s in imp) == 0
    )  # below the resolution: reject every impostor
    assert rounded_threshold_at_far(imp, 0.999999) == 0.0001  # every impostor but the lowest may pass


def test_clopper_pearson_matches_known_values() -> None:
    lo, hi = clopper_pearson(0, 100)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 100), rel=1e-6)  # exact for k = 0: 0.0362
    lo, hi = clopper_pearson(5, 100)  # textbook: [0.0164, 0.1128]
    assert lo == pytest.approx(0.01643, abs=1e-4) and hi == pytest.approx(0.11284, abs=1e-4)
    lo, hi = clopper_pearson(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 100), rel=1e-6)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_operating_point_states_far_interval_and_resolution() -> None:
    rng = np.random.default_rng(0)
    imp = rng.normal(0.85, 0.02, 2000).tolist()
    gen = rng.normal(0.95, 0.02, 200).tolist()
    p = operating_point(gen, imp, 1e-2)
    assert p["impostors_accepted"] <= 20 and p["far"] == p["impostors_accepted"] / 2000
    assert p["far_ci95"][0] <= p["far"] <= p["far_ci95"][1]
    assert p["tar"] == sum(s >= p["threshold"] for s in gen) / 200 and p["resolved"]
    assert not operating_point(gen, imp, 1e-4)["resolved"]  # 2000 trials cannot resolve 1e-4


def _embeddings(n_id: int, photos: int, keys: int, spread: float, seed: int = 0) -> list[np.ndarray]:
    """Per identity (keys, photos, D) unit vectors: a centre per (identity, key) plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_id):
        centre = rng.normal(size=(keys, 1, 16))
        e = centre + spread * rng.normal(size=(keys, photos, 16))
        out.append((e / np.linalg.norm(e, axis=-1, keepdims=True)).astype(np.float32))
    return out


def test_trials_score_the_right_pairs() -> None:
    emb = _embeddings(5, 3, 2, spread=0.1)
    emb[4] = emb[4][:, :2]  # one identity with two photos: only in size-1 trials
    one, two = trials(emb, "1"), trials(emb, "2")
    assert len(one["genuine"]) == 5 * 2 and len(one["impostor"]) == 5 * 4 * 2
    assert len(one["other_key"]) == 5 * 4 * 2 and len(one["old_key"]) == 5 * 2
    assert len(two["genuine"]) == 4 * 2 and trials(emb, "3+")["genuine"] == []
    # genuine = the identity's last photo against the mean of its first photos, same key
    t = emb[0][0, :2].mean(0)
    expected = float(t / np.linalg.norm(t) @ emb[0][0, -1])
    assert math.isclose(two["genuine"][0], expected, rel_tol=1e-5)
    assert min(one["genuine"]) > max(one["impostor"])  # tight identities, random keys: separable
    assert decision_rates(one, 2.0)["genuine"]["accepted"] == 0.0


def test_calibrated_manifest_section_and_policy() -> None:
    emb = _embeddings(30, 4, 2, spread=0.6, seed=1)
    result = calibrate_sizes(emb)
    assert set(result) == {"1", "2", "3+"}
    section = verify_section(result, 1e-2, "dlib-resnet:abc:cosine")
    manifest = {"verify": section, "engine": {"verify_threshold": 0.5}}
    policy = verify_policy(manifest, EngineSettings())
    assert policy.matcher == "dlib-resnet:abc:cosine" and not policy.explicit
    for size, key in ((1, "1"), (2, "2"), (5, "3+")):
        d = policy.decide(size)
        assert d.threshold == section["thresholds"][key]
        assert d.far is not None and d.far <= 1e-2 and d.far_ci95 is not None
    # a FAR target picks the point at or below it; one finer than the sample resolves is refused
    assert policy.decide(1, far=0.05).threshold == section["thresholds"]["1"]
    assert policy.decide(1, far=0.2).far is not None
    with pytest.raises(UncalibratedFarError):
        policy.decide(1, far=1e-4)  # 30 x 29 x 2 impostor trials
    # an explicit threshold keeps its FAR upper bound from the calibrated points; below them, none
    assert policy.decide(1, threshold=1.0).far is not None
    assert policy.decide(1, threshold=-1.0).far is None
    # a deployment's explicit threshold wins over the per-size thresholds
    explicit = verify_policy(manifest, EngineSettings(verify_threshold=0.77))
    assert explicit.decide(1).threshold == 0.77
    with pytest.raises(ValueError):
        policy.decide(1, threshold=0.9, far=1e-2)


def test_uncalibrated_bundle_and_matcher_names() -> None:
    manifest = {"components": {"identity": {"format": "dlib-resnet", "sha256": "55533b28a95800a551ba"}}}
    assert matcher_of(manifest) == "dlib-resnet:55533b28a958:cosine"
    policy = verify_policy(manifest, EngineSettings())
    d = policy.decide(1)
    assert d.threshold == EngineSettings().verify_threshold and d.far is None
    with pytest.raises(UncalibratedFarError):
        policy.decide(1, far=1e-3)
    assert VerifyPolicy("m", 0.9, True, {}, {}).decide(None).threshold == 0.9
    assert [size_key(n) for n in (None, 0, 1, 2, 3, 7)] == [None, None, "1", "2", "3+", "3+"]


def test_default_matcher_follows_the_engine_family_and_a_stale_calibration_is_refused() -> None:
    identity = {"format": "dlib-resnet", "sha256": "55533b28a95800a551ba"}
    keymap = {"components": {"identity": identity, "encoder": {"format": "keymap-mlp"}}}
    assert default_matcher(keymap) == "dlib-resnet:55533b28a958:keymap-whitened"
    assert matcher_of(keymap) == default_matcher(keymap)
    stale = {**keymap, "verify": {"matcher": "dlib-resnet:55533b28a958:cosine"}}
    assert matcher_of(stale) == "dlib-resnet:55533b28a958:cosine"
    check_matcher(matcher_of(keymap), "keymap-whitened")
    with pytest.raises(BundleError, match="recalibrate"):
        check_matcher(matcher_of(stale), "keymap-whitened")


def test_calibration_mismatch_warns_only_when_the_recorded_engine_differs() -> None:
    manifest = {"calibration": {"verify": {"engine_fingerprint": "km:aaaa"}}}
    assert calibration_mismatch(manifest, "km:aaaa") is None
    warning = calibration_mismatch(manifest, "km:bbbb")
    assert warning is not None and "km:aaaa" in warning and "km:bbbb" in warning
    assert calibration_mismatch({}, "km:bbbb") is None  # nothing recorded: nothing to compare
    assert calibration_mismatch({"calibration": {"verify": {}}}, "km:bbbb") is None


def test_calibrate_threshold_refuses_zero_steps_before_loading_anything(tmp_path: Path) -> None:
    import argparse

    from worker.bundletool import calibrate

    ap = argparse.ArgumentParser()
    calibrate.add_arguments(ap)
    args = ap.parse_args([str(tmp_path), "--steps", "0"])  # no bundle there: the check must come first
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        calibrate.main(args)
