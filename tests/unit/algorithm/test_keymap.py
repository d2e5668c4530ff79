"""The keymap generator family: DCGAN loader, key transform, key map, engine (tiny seeded models, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.algorithm.config import EngineConfig
from worker.algorithm.factory import build_engine
from worker.algorithm.keymap import KeyMapModel, key_nuisance, key_rotation, load_keymap, save_keymap
from worker.algorithm.keymap_engine import KeymapEngine
from worker.errors import BundleError, CheckpointLayoutError, InvalidTensorError, KeyError_
from worker.evaluation.keymap_attack import keymap_reinversion_attack
from worker.models.bundle import ModelBundle, load_bundle
from worker.models.dcgan import DCGANGenerator, load_dcgan

REPO = Path(__file__).resolve().parents[3]
SEED_A, SEED_B = bytes(range(32)), bytes(range(1, 33))


class TinyIdentity(torch.nn.Module):
    """A random differentiable 'recognizer': pooled pixels -> linear -> L2-normalised 16-D embedding."""

    embedding_dim = 16

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 8 * 8, 16)

    def embed(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images, 8).flatten(1)
        return F.normalize(self.fc(x) + 0.5, dim=-1)


def tiny_keymap() -> KeyMapModel:
    torch.manual_seed(1)
    km = KeyMapModel(emb_dim=16, k=6, nuisance_dim=4, hidden=32, depth=2, z_dim=8)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    km.mean_dir.copy_(F.normalize(torch.ones(16), dim=0))
    km.real_basis.copy_(q[:, :6])
    km.gen_basis.copy_(q[:, 3:9])
    km.real_std.copy_(torch.linspace(0.5, 0.1, 6))
    km.gen_std.copy_(torch.linspace(0.4, 0.1, 6))
    return km


def tiny_bundle() -> ModelBundle:
    torch.manual_seed(2)
    gen = DCGANGenerator(nz=8, ngf=4).eval()
    km = tiny_keymap().eval()
    km.input_size = 32  # instance override: tiny crops
    return ModelBundle(generator=gen, encoder=km, identity=TinyIdentity().eval(), attribute=None, bundle_id="tiny")


def tiny_engine(steps: int = 3) -> KeymapEngine:
    return KeymapEngine(tiny_bundle(), EngineConfig(steps=steps, lr=0.05))


def faces(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- DCGAN loader ---------------------------------------------------------------------------------------------------
def test_dcgan_loads_package_layout_strictly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = DCGANGenerator(nz=8, ngf=4)
    path = tmp_path / "weights.tar"
    torch.save({"netG_state_dict": ref.state_dict()}, path)
    gen = load_dcgan(path, {"z_dim": 8, "ngf": 4}).eval()
    z = torch.randn(2, 8)
    assert torch.equal(gen(z), ref.eval()(z))
    assert gen.synthesis(z[:, None]).shape == (2, 3, 64, 64)
    assert torch.equal(gen.mapping(z), z) and gen.n_latent == 1 and gen.w_avg.shape == (8,)
    torch.save({"netG_state_dict": DCGANGenerator(nz=8, ngf=8).state_dict()}, path)
    with pytest.raises(CheckpointLayoutError):
        load_dcgan(path, {"z_dim": 8, "ngf": 4})
    torch.save({"other": {}}, path)
    with pytest.raises(CheckpointLayoutError):
        load_dcgan(path, {"z_dim": 8, "ngf": 4})


# --- key transform and key map --------------------------------------------------------------------------------------
def test_key_rotation_and_nuisance_are_seeded() -> None:
    r = key_rotation(SEED_A, 6)
    assert torch.allclose(r @ r.T, torch.eye(6), atol=1e-5)
    assert torch.equal(r, key_rotation(SEED_A, 6))
    assert not torch.allclose(r, key_rotation(SEED_B, 6))
    assert torch.equal(key_nuisance(SEED_A, 4), key_nuisance(SEED_A, 4))
    assert not torch.equal(key_nuisance(SEED_A, 4), key_nuisance(SEED_B, 4))


def test_key_transform_keeps_whitened_cosines_and_changes_with_key() -> None:
    km = tiny_keymap()
    e = F.normalize(torch.randn(5, 16), dim=-1)
    plain = km.targets(e, None)
    assert torch.allclose(plain.norm(dim=-1), torch.ones(5), atol=1e-5)
    rot = key_rotation(SEED_A, 6).expand(5, 6, 6)
    keyed = km.targets(e, rot)
    assert torch.allclose(keyed @ keyed.T, plain @ plain.T, atol=1e-5)  # people keep their relations
    other = km.targets(e, key_rotation(SEED_B, 6).expand(5, 6, 6))
    assert float(F.cosine_similarity(keyed, other).abs().mean()) < 0.99
    # the mean direction carries no identity: adding it to every embedding does not move the targets
    shifted = F.normalize(e + 3.0 * km.mean_dir, dim=-1)
    assert torch.allclose(km.targets(shifted, rot), keyed, atol=1e-4)
    # row results do not depend on the batch (to fp32 rounding)
    assert torch.allclose(km.targets(e[:1], rot[:1]), keyed[:1], atol=1e-6)


def test_keymap_output_on_prior_shell_and_roundtrip(tmp_path: Path) -> None:
    km = tiny_keymap()
    t = F.normalize(torch.randn(3, 6), dim=-1)
    z = km(t, torch.randn(3, 4))
    assert torch.allclose(z.norm(dim=-1), torch.full((3,), 8**0.5), atol=1e-4)
    save_keymap(km, tmp_path / "keymap.pt", {"steps": 0})
    again = load_keymap(tmp_path / "keymap.pt", {"prior_weight": 0.2})
    assert again.prior_weight == 0.2 and again.k == 6
    nu = torch.randn(3, 4)
    assert torch.allclose(again(t, nu), km(t, nu), atol=1e-6)
    torch.save({"format_version": 99}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointLayoutError):
        load_keymap(tmp_path / "bad.pt")


# --- engine ---------------------------------------------------------------------------------------------------------
def test_engine_api_shapes_determinism_and_keys() -> None:
    eng = tiny_engine()
    assert isinstance(build_engine(eng.bundle, eng.config), KeymapEngine)
    x = faces(2)
    r1 = eng.enroll(x, SEED_A)
    assert r1.images.shape == (2, 3, 64, 64) and r1.embeddings.shape == (2, 16) and r1.template.shape == (16,)
    assert float(r1.images.min()) >= -1 and float(r1.images.max()) <= 1
    assert torch.allclose(r1.template.norm(), torch.tensor(1.0), atol=1e-5)
    r2 = eng.enroll(x, SEED_A)
    assert torch.equal(r1.images, r2.images)
    other = eng.enroll(x, SEED_B)
    assert not torch.allclose(r1.images, other.images)
    p = eng.probe(x[0], SEED_A)
    assert p.image.shape == (3, 64, 64) and abs(eng.score(p.embedding, r1.template)) <= 1.0 + 1e-6
    assert eng.fingerprint.startswith("tiny:") and eng.fingerprint == tiny_engine().fingerprint
    assert eng.fingerprint != KeymapEngine(tiny_bundle(), EngineConfig(steps=4, lr=0.05)).fingerprint
    assert eng.encoder(x).shape == (2, 1, 8)  # the no-key reconstruction path the evaluation uses
    assert eng.input_size == 32 and eng.output_size == 64 and eng.embedding_dim == 16


def test_engine_batching_is_equivalent() -> None:
    eng = tiny_engine()
    subjects = [(faces(1, 0), SEED_A), (faces(2, 1), SEED_B), (faces(1, 2), SEED_A)]
    together = eng.enroll_many(subjects)
    for (f, s), r in zip(subjects, together, strict=True):
        alone = eng.enroll(f, s)
        assert torch.equal(alone.images, r.images)  # every image runs alone: bit-identical
        assert torch.equal(alone.template, r.template)


def test_engine_refinement_moves_toward_target() -> None:
    eng = tiny_engine(steps=0)
    x = faces(4)
    z0, t = eng.start_latents(x, [SEED_A] * 4)
    z = eng.refine(z0, t, steps=30)
    from worker.algorithm.keymap import identity_loss

    def loss(zz: torch.Tensor) -> float:
        with torch.no_grad():
            return float(identity_loss(eng.keymap, eng.identity.embed(eng.generator(zz), "x"), t).mean())

    assert loss(z) < loss(z0)


def test_engine_rejects_bad_inputs() -> None:
    eng = tiny_engine()
    with pytest.raises(InvalidTensorError):
        eng.enroll(faces(1, size=16), SEED_A)
    with pytest.raises(InvalidTensorError):
        eng.enroll(faces(1) * 3, SEED_A)
    with pytest.raises(KeyError_):
        eng.enroll(faces(1), b"short")
    with pytest.raises(InvalidTensorError):
        eng.probe(faces(1), SEED_A)


# --- the shipped bundle (needs the gan-face-generate and face_recognition_models packages) -------------------------
KEYMAP_MANIFEST = REPO / "worker" / "bundles" / "keymap" / "manifest.json"


@pytest.mark.skipif(
    importlib.util.find_spec("gan_face_generate") is None or not KEYMAP_MANIFEST.is_file(),
    reason="gan-face-generate not installed (scripts/bootstrap.sh installs it with --no-deps) or no keymap bundle",
)
def test_shipped_keymap_bundle_loads_with_pinned_hashes() -> None:
    d = REPO / "worker" / "bundles" / "keymap"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["components"]["generator"]["path"] == "pkg://gan_face_generate/weights.tar"
    bundle = load_bundle(d)
    eng = build_engine(bundle, EngineConfig(steps=1))
    assert isinstance(eng, KeymapEngine) and eng.input_size == 150 and eng.output_size == 64
    r = eng.enroll(torch.zeros(1, 3, 150, 150), SEED_A)
    assert r.images.shape == (1, 3, 64, 64)


def test_engine_reinversion_attack_shapes() -> None:
    eng = tiny_engine()
    c = eng.enroll(faces(2), SEED_A).images
    nokey, keyknown = keymap_reinversion_attack(eng, c, [SEED_A, SEED_A], steps=2)
    assert nokey.shape == keyknown.shape == (2, 3, 64, 64)


def test_keymap_is_an_embedded_bundle_name() -> None:
    from worker.service.engine import resolve_bundle_dir

    assert resolve_bundle_dir("keymap") == REPO / "worker" / "bundles" / "keymap"
    assert resolve_bundle_dir("lite") == REPO / "tests" / "fixtures" / "bundles" / "lite"


def test_lite_outside_a_source_checkout_fails_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    from worker.service import engine as service_engine

    monkeypatch.setitem(service_engine.EMBEDDED_BUNDLES, "lite", tmp_path / "absent")  # as in an installed wheel
    with pytest.raises(BundleError, match="test fixture of a source checkout.*CANCELABLE_ENGINE__BUNDLE=keymap"):
        service_engine.check_bundle_present("lite")


def test_score_is_cosine_in_whitened_generator_coordinates() -> None:
    """The keymap matcher compares faces where the key map aims them: unit whitened generator coordinates. Scores do
    not depend on which rows are projected together, and a template's coordinates are its photos' mean."""
    engine = tiny_engine()
    km = engine.keymap
    with torch.no_grad():
        km.mean_dir.copy_(F.normalize(torch.randn(km.emb_dim), dim=0))
        km.gen_std.copy_(torch.linspace(0.5, 2.0, km.k))
    a, b, c = F.normalize(torch.randn(3, engine.embedding_dim, generator=torch.Generator().manual_seed(5)), dim=-1)
    want = float(F.cosine_similarity(km.gen_coords(a[None]), km.gen_coords(b[None]))[0])
    assert engine.score(a, b) == pytest.approx(want, abs=1e-6)
    assert engine.score(a, b) != pytest.approx(float(a @ b), abs=1e-3)  # not the raw cosine
    together = engine.match_space(torch.stack([a, b, c]))
    assert torch.equal(together[1], engine.match_space(b[None])[0])
    mean = engine.match_coords(F.normalize(a + c, dim=0)[None])[0]
    assert F.cosine_similarity(mean, engine.match_coords(torch.stack([a, c])).sum(0), dim=0) > 1 - 1e-6
    assert engine.matcher_kind == "keymap-whitened"
