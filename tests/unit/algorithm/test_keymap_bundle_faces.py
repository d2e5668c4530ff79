"""The shipped keymap bundle on real faces, through the engine as a worker runs it (engine scores, bundle threshold):
genuine accepted; after revoke + reissue the reissued template does not match the revoked one, the old and the new
probes of the subject stay apart across versions, and an impostor is rejected under the reissued key.

Needs ../shared (faces), the installed gan-face-generate package and the committed bundle; skips otherwise.
Keys are fixed public test keys (deterministic)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "worker" / "bundles" / "keymap"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gan_face_generate") is None or not (BUNDLE / "manifest.json").is_file(),
    reason="gan-face-generate not installed (scripts/bootstrap.sh installs it with --no-deps) or no keymap bundle",
)


@pytest.fixture(scope="module")
def deployed():
    import torch

    from worker.algorithm.factory import build_engine
    from worker.bundle_config import deployed_config, verify_policy
    from worker.models.bundle import load_bundle
    from worker.settings import EngineSettings

    torch.set_num_threads(1)
    engine = build_engine(load_bundle(BUNDLE), deployed_config(BUNDLE, None, None))
    policy = verify_policy(json.loads((BUNDLE / "manifest.json").read_text()), EngineSettings())
    return engine, policy  # the worker's decision rule: the calibrated threshold for the template's size


def test_revoke_reissue_and_impostor_with_keymap_bundle(deployed, smoke_faces) -> None:
    from worker.evaluation.evaluator import load_rgb
    from worker.keys.derive import derive_seed

    engine, policy = deployed
    threshold = policy.decide(2).threshold  # two-photo templates below
    face = {k: engine.prepare(load_rgb(p)) for k, p in smoke_faces.items()}
    material = hashlib.sha256(b"keymap-test-key").digest()
    v1, v2 = (derive_seed(material, "acme", "alice", v) for v in (1, 2))
    import torch

    enrolled1 = engine.enroll(torch.stack([face["obama"], face["obama2"]]), v1)
    enrolled2 = engine.enroll(torch.stack([face["obama"], face["obama2"]]), v2)  # reissue after revoking v1
    genuine2 = engine.probe(face["obama3"], v2)
    impostor2 = engine.probe(face["biden"], v2)
    old_probe = engine.probe(face["obama3"], v1)
    scores = {
        "genuine_v2": engine.score(genuine2.embedding, enrolled2.template),
        "impostor_v2": engine.score(impostor2.embedding, enrolled2.template),
        "reissued_vs_revoked": engine.score(enrolled1.template, enrolled2.template),
        "v1_probe_vs_v2_template": engine.score(old_probe.embedding, enrolled2.template),
    }
    assert scores["genuine_v2"] >= threshold, scores
    assert scores["impostor_v2"] < threshold, scores
    assert scores["reissued_vs_revoked"] < threshold, scores
    assert scores["v1_probe_vs_v2_template"] < threshold, scores


def test_one_photo_enrolment_decides_right_at_its_threshold(deployed, smoke_faces) -> None:
    """What the README walk-through and the demo do: enrol ONE photo, verify a genuine and an impostor probe."""
    import torch

    from worker.evaluation.evaluator import load_rgb
    from worker.keys.derive import derive_seed

    engine, policy = deployed
    rule = policy.decide(1)
    assert rule.far is not None and rule.far <= 1e-3  # the shipped one-photo threshold stands for FAR <= 0.1 %
    face = {k: engine.prepare(load_rgb(p)) for k, p in smoke_faces.items()}
    seed = derive_seed(hashlib.sha256(b"keymap-test-key").digest(), "acme", "alice", 1)
    template = engine.enroll(torch.stack([face["obama"]]), seed).template
    genuine = engine.score(engine.probe(face["obama3"], seed).embedding, template)
    impostor = engine.score(engine.probe(face["biden"], seed).embedding, template)
    assert genuine >= rule.threshold > impostor, (genuine, impostor, rule.threshold)
