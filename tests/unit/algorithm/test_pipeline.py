"""Engine API on tiny models: shapes, determinism, key dependence, what optimisation achieves, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import EMB_DIM, RES, person_faces, tiny_bundle

from worker.algorithm.config import EngineConfig
from worker.algorithm.keylatent import key_orthogonal, key_target
from worker.algorithm.pipeline import KEY_TARGET_LABEL, Engine
from worker.errors import InvalidTensorError, KeyError_, NoFaceError

SEED_A = bytes([7]) * 32
SEED_B = bytes([9]) * 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(tiny_bundle(), EngineConfig())


def test_enroll_and_probe_shapes_ranges_and_template(engine: Engine) -> None:
    faces = person_faces(3, 0)
    res = engine.enroll(faces, SEED_A)
    assert res.images.shape == (3, 3, RES, RES) and res.images.dtype == torch.float32
    assert res.images.device.type == "cpu"
    assert float(res.images.min()) >= -1.0 and float(res.images.max()) <= 1.0
    assert res.embeddings.shape == (3, EMB_DIM) and res.template.shape == (EMB_DIM,)
    torch.testing.assert_close(res.embeddings.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(res.template, F.normalize(res.embeddings.mean(0), dim=0))
    probe = engine.probe(person_faces(1, 0, seed=5)[0], SEED_A)
    assert probe.image.shape == (3, RES, RES) and probe.embedding.shape == (EMB_DIM,)
    assert engine.score(probe.embedding, res.template) == pytest.approx(float(probe.embedding @ res.template), abs=1e-6)


def test_same_input_same_key_is_deterministic_and_keys_matter(engine: Engine) -> None:
    faces = person_faces(2, 1)
    a1, a2 = engine.enroll(faces, SEED_A), engine.enroll(faces, SEED_A)
    assert torch.equal(a1.images, a2.images) and torch.equal(a1.template, a2.template)
    b = engine.enroll(faces, SEED_B)
    assert (a1.images - b.images).abs().max() > 0.05


def test_models_stay_frozen_and_get_no_gradients(engine: Engine) -> None:
    engine.enroll(person_faces(2, 2), SEED_A)
    for model in (engine.generator, engine.encoder, engine.identity, engine.attribute):
        assert isinstance(model, torch.nn.Module) and not model.training
        for p in model.parameters():
            assert not p.requires_grad and p.grad is None


def _mean_abs_cos_to_original(engine: Engine, steps: int) -> float:
    eng = Engine(engine.bundle, EngineConfig(steps=steps))
    cos = []
    for person in range(3):
        faces = person_faces(2, person)
        res = eng.enroll(faces, bytes([person + 1]) * 32)
        cos.append((res.embeddings * engine.identity.embed(faces, "dlib-chip")).sum(-1).abs())
    return float(torch.cat(cos).mean())


def test_optimisation_lowers_similarity_to_the_original(engine: Engine) -> None:
    before, after = _mean_abs_cos_to_original(engine, 0), _mean_abs_cos_to_original(engine, 50)
    assert after < before - 0.03


def test_key_target_pulls_embeddings_toward_the_key_seeded_target() -> None:
    bundle = tiny_bundle()
    faces = person_faces(2, 3)
    target = key_target(bundle.identity.embed(faces, "dlib-chip"), key_orthogonal(SEED_A, EMB_DIM, KEY_TARGET_LABEL))
    off = Engine(bundle, EngineConfig(key_target=False)).enroll(faces, SEED_A)
    on = Engine(bundle, EngineConfig(key_target=True, w_key=10.0)).enroll(faces, SEED_A)
    cos_off = float((off.embeddings * target).sum(-1).mean())
    cos_on = float((on.embeddings * target).sum(-1).mean())
    assert cos_on > cos_off + 0.02


def test_split_presets_change_the_result() -> None:
    bundle = tiny_bundle()
    faces = person_faces(1, 4)
    code = Engine(bundle, EngineConfig(split="code")).enroll(faces, SEED_A)
    readme = Engine(bundle, EngineConfig(split="readme")).enroll(faces, SEED_A)
    assert (code.images - readme.images).abs().max() > 0.01


def test_mixed_precision_flag_is_a_no_op_on_cpu() -> None:
    bundle = tiny_bundle(with_attribute=False)
    faces = person_faces(2, 5)
    on = Engine(bundle, EngineConfig(mixed_precision=True, w_attr=0.0)).enroll(faces, SEED_A)
    off = Engine(bundle, EngineConfig(mixed_precision=False, w_attr=0.0)).enroll(faces, SEED_A)
    assert torch.equal(on.images, off.images)


def test_enroll_many_keeps_order_and_handles_empty_input() -> None:
    exact = Engine(tiny_bundle(), EngineConfig(dtype="float64"))  # a fresh bundle: float64 converts its models
    subjects = [(person_faces(1, p), bytes([p + 1]) * 32) for p in range(3)]
    many = exact.enroll_many(subjects)
    assert len(many) == 3 and exact.enroll_many([]) == []
    alone = [exact.enroll(faces, seed) for faces, seed in subjects]
    for i, res in enumerate(many):
        # float64 exact mode: equal up to one float32 rounding of the output (see test_optimise_batching)
        torch.testing.assert_close(res.images, alone[i].images, atol=1e-6, rtol=0)
        for j in range(3):
            if j != i:
                assert (res.images - alone[j].images).abs().max() > 0.05  # in input order, not shuffled


@pytest.mark.parametrize(
    "faces",
    [
        torch.zeros(2, 3, RES, RES, dtype=torch.uint8),  # integer pixels
        torch.zeros(2, 3, RES, RES, dtype=torch.int64),
        torch.zeros(3, RES, RES),  # missing batch dimension
        torch.zeros(0, 3, RES, RES),  # no images
        torch.zeros(2, 1, RES, RES),  # grey
        torch.zeros(2, 3, RES + 1, RES + 1),  # wrong crop size
        torch.full((1, 3, RES, RES), 255.0),  # 0-255 floats
        torch.full((1, 3, RES, RES), float("nan")),
        np.zeros((1, 3, RES, RES), dtype=np.float32),  # not a tensor
    ],
)
def test_invalid_faces_raise_invalid_tensor(engine: Engine, faces: object) -> None:
    with pytest.raises(InvalidTensorError):
        engine.enroll(faces, SEED_A)  # type: ignore[arg-type]


def test_inputs_just_outside_range_are_clamped_not_rejected(engine: Engine) -> None:
    faces = person_faces(1, 0)
    faces[0, 0, 0, 0] = 1.0005  # resampling overshoot: a valid image, not bad input
    faces[0, 1, 2, 3] = -1.0004
    out = engine.enroll(faces, SEED_A)
    clamped = engine.enroll(faces.clamp(-1.0, 1.0), SEED_A)
    assert torch.equal(out.template, clamped.template)
    assert torch.equal(out.images, clamped.images)
    with pytest.raises(InvalidTensorError):  # far outside [-1, 1] is not an image in range: refused
        engine.enroll(person_faces(1, 0) * 4.0, SEED_A)


@pytest.mark.parametrize("seed", [b"", b"\x01" * 31, "x" * 32, None])
def test_bad_seed_raises_key_error_without_echoing_it(engine: Engine, seed: object) -> None:
    with pytest.raises(KeyError_) as info:
        engine.enroll(person_faces(1, 0), seed)  # type: ignore[arg-type]
    assert "\\x01" not in str(info.value)


def test_probe_and_score_validate(engine: Engine) -> None:
    with pytest.raises(InvalidTensorError):
        engine.probe(person_faces(2, 0), SEED_A)
    with pytest.raises(InvalidTensorError):
        engine.score(torch.zeros(EMB_DIM), torch.zeros(EMB_DIM + 1))
    with pytest.raises(InvalidTensorError):
        engine.score(torch.zeros(EMB_DIM, dtype=torch.long), torch.zeros(EMB_DIM, dtype=torch.long))
    a = F.normalize(torch.randn(EMB_DIM), dim=0)
    assert engine.score(a, a) == pytest.approx(1.0, abs=1e-6)
    assert engine.score(a, -a) == pytest.approx(-1.0, abs=1e-6)


def test_fingerprint_tracks_result_settings_only() -> None:
    bundle = tiny_bundle()
    base = Engine(bundle, EngineConfig()).fingerprint
    assert base.startswith("tiny-test:")
    assert Engine(bundle, EngineConfig(mixed_precision=False, max_batch_images=4)).fingerprint == base
    for other in (EngineConfig(split="readme"), EngineConfig(steps=49), EngineConfig(key_target=False)):
        assert Engine(bundle, other).fingerprint != base
    centred = EngineConfig(key_target_center=[1.0] + [0.0] * (EMB_DIM - 1))  # a manifest gives a list
    assert centred.key_target_center == (1.0,) + (0.0,) * (EMB_DIM - 1)
    assert Engine(bundle, centred).fingerprint != base


def test_key_target_center_is_checked() -> None:
    with pytest.raises(ValueError, match="non-zero"):
        EngineConfig(key_target_center=[0.0] * EMB_DIM)
    with pytest.raises(ValueError, match="finite"):
        EngineConfig(key_target_center=[float("nan")] * EMB_DIM)
    with pytest.raises(ValueError, match="identity model gives"):
        Engine(tiny_bundle(), EngineConfig(key_target_center=[1.0, 0.0, 0.0]))


def test_centred_key_target_is_what_the_optimisation_pulls_towards() -> None:
    """With a center the engine's key rotation fixes it (the target keeps its angle to the center)."""
    bundle = tiny_bundle()
    center = torch.nn.functional.normalize(torch.arange(1.0, EMB_DIM + 1.0), dim=0)
    eng = Engine(bundle, EngineConfig(key_target_center=center.tolist(), steps=2))
    rot = eng._key_rotation(SEED_A)
    torch.testing.assert_close(rot @ center, center, atol=1e-5, rtol=0)
    assert not torch.allclose(rot, Engine(bundle, EngineConfig(steps=2))._key_rotation(SEED_A))


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError):
        EngineConfig(split="other")


def test_prepare_aligns_a_real_face(engine: Engine, smoke_faces: dict) -> None:
    pytest.importorskip("dlib")
    from PIL import Image

    rgb = np.asarray(Image.open(smoke_faces["biden"]).convert("RGB"))
    face = engine.prepare(rgb)
    assert face.shape == (3, RES, RES) and face.dtype == torch.float32
    assert float(face.min()) >= -1.0 and float(face.max()) <= 1.0 and float(face.std()) > 0.05
    with pytest.raises(NoFaceError):
        engine.prepare(np.full((200, 200, 3), 128, dtype=np.uint8))


def test_algorithm_package_imports_no_service_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys, worker.algorithm.pipeline, worker.algorithm.config, worker.keys.derive\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('celery', 'boto3', 'botocore', 'redis')"
        " or m == 'worker.settings']\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.slow
def test_lite_bundle_end_to_end_on_real_faces(smoke_faces: dict) -> None:
    """The embedded lite bundle (when trained and present) through prepare -> enroll -> probe -> score."""
    from pathlib import Path

    from PIL import Image

    lite = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "bundles" / "lite"
    if not (lite / "manifest.json").is_file():
        pytest.skip("lite bundle not present (tests/fixtures/bundles/lite/manifest.json)")
    from worker.models.bundle import load_bundle

    engine = Engine(load_bundle(lite, "cpu"), EngineConfig(steps=5))
    faces = [engine.prepare(np.asarray(Image.open(smoke_faces[n]).convert("RGB"))) for n in sorted(smoke_faces)]
    obama = [f for n, f in zip(sorted(smoke_faces), faces, strict=True) if n.startswith("obama")]
    res = engine.enroll(torch.stack(obama[:2]), SEED_A)
    probe = engine.probe(obama[2], SEED_A)
    g = engine.output_size
    assert res.images.shape == (2, 3, g, g) and probe.image.shape == (3, g, g)
    assert -1.0 <= engine.score(probe.embedding, res.template) <= 1.0


def _enrol_then_probe(key_target: bool) -> tuple[float, float, float]:
    """6 synthetic persons: enrol 2 images, later probe the 3rd alone (genuine) and every other person's 3rd image
    under the victim's key (impostor holding the victim's key). In-loss recognizer = LinearIdentity.
    -> (genuine mean, impostor mean, mean |cos(probe, its original)|)."""
    bundle = tiny_bundle(with_attribute=False, linear_identity=True)
    engine = Engine(bundle, EngineConfig(key_target=key_target, w_key=30.0, w_attr=0.0))
    persons = [person_faces(3, p, jitter=0.3) for p in range(6)]
    keys = [bytes([p + 1]) * 32 for p in range(6)]
    templates = [r.template for r in engine.enroll_many([(f[:2], k) for f, k in zip(persons, keys, strict=True)])]
    # each probe is its own subject, so one batched call == probing each alone (test_optimise_batching)
    pairs = [(p, q) for p in range(6) for q in range(6)]
    probes = engine.enroll_many([(persons[q][2:], keys[p]) for p, q in pairs])
    genuine = [engine.score(r.embeddings[0], templates[p]) for (p, q), r in zip(pairs, probes, strict=True) if p == q]
    impostor = [engine.score(r.embeddings[0], templates[p]) for (p, q), r in zip(pairs, probes, strict=True) if p != q]
    originals = bundle.identity.embed(torch.stack([f[2] for f in persons]), "dlib-chip")
    prot = [abs(float(r.embeddings[0] @ originals[q])) for (p, q), r in zip(pairs, probes, strict=True) if p == q]
    return float(np.mean(genuine)), float(np.mean(impostor)), float(np.mean(prot))


def test_key_target_keeps_impostors_with_the_victims_key_away_from_the_template() -> None:
    gen_off, imp_off, prot_off = _enrol_then_probe(False)
    gen_on, imp_on, prot_on = _enrol_then_probe(True)
    assert imp_on < imp_off - 0.1  # the key alone no longer carries an impostor onto the template
    assert gen_on > gen_off - 0.05  # genuine probes still land on it
    assert gen_on - imp_on > gen_off - imp_off + 0.1
    assert prot_on < 0.1 and prot_off < 0.1  # both stay unlike the original in the in-loss recognizer


def test_a_bundle_without_a_required_model_is_rejected() -> None:
    from worker.errors import BundleError

    bundle = tiny_bundle()
    bundle.encoder = None  # type: ignore[assignment]
    with pytest.raises(BundleError):
        Engine(bundle, EngineConfig())
