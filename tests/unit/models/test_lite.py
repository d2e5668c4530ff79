"""The lite encoder/generator: shapes, strict loading, determinism, the Gaussian mapping, and the committed bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.errors import CheckpointLayoutError, HashMismatchError
from worker.models.base import Encoder, Generator
from worker.models.lite import (
    LiteEncoder,
    LiteGenerator,
    fit_gaussian_mapping,
    load_lite_encoder,
    load_lite_generator,
    n_latent_for,
)

torch.set_num_threads(1)

TINY = {
    "resolution": 16,
    "w_dim": 32,
    "z_dim": 32,
    "g_channels": [32, 16, 8],
    "e_channels": [8, 16, 16],
    "e_hidden": 32,
}
BUNDLE = Path(__file__).resolve().parents[2] / "fixtures" / "bundles" / "lite"


def _tiny(seed: int = 0) -> tuple[LiteGenerator, LiteEncoder]:
    torch.manual_seed(seed)
    return LiteGenerator(TINY).eval(), LiteEncoder(TINY).eval()


def test_tiny_shapes_and_protocols():
    g, e = _tiny()
    assert isinstance(g, Generator) and isinstance(e, Encoder)
    assert g.n_latent == n_latent_for(16) == 6 and g.alignment == e.alignment == "dlib-chip"
    assert e.input_size == g.resolution == 16
    w = g.mapping(torch.randn(5, 32))
    assert w.shape == (5, 32)
    img = g.synthesis(w[:, None].repeat(1, 6, 1) * 10)
    assert img.shape == (5, 3, 16, 16) and img.min() >= -1 and img.max() <= 1
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    wplus = e(x)
    assert wplus.shape == (5, 6, 32)
    code, delta = e.encode_parts(x)
    assert torch.equal(delta[:, 0], torch.zeros_like(delta[:, 0]))
    assert torch.allclose(wplus[:, 0], code)


def test_bad_shapes_are_rejected():
    g, e = _tiny()
    with pytest.raises(ValueError):
        g.synthesis(torch.zeros(1, 5, 32))
    with pytest.raises(ValueError):
        e(torch.zeros(1, 3, 32, 32))
    with pytest.raises(CheckpointLayoutError):
        LiteGenerator({"resolution": 48})
    with pytest.raises(CheckpointLayoutError):
        LiteGenerator({"no_such_key": 1})


def test_default_config_is_small():
    g, e = LiteGenerator(), LiteEncoder()
    n = sum(p.numel() for p in g.parameters()) + sum(p.numel() for p in e.parameters())
    assert g.n_latent == 10 and g.resolution == 64
    assert n * 2 < 30e6  # stored in fp16: well under the 30 MB limit


def test_deterministic_init_from_seed():
    g1, e1 = _tiny(7)
    g2, e2 = _tiny(7)
    g3, _ = _tiny(8)
    for a, b in ((g1, g2), (e1, e2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(g1.const, g3.const)


def test_strict_load_round_trip(tmp_path):
    g, e = _tiny(3)
    with torch.no_grad():  # make the encoder's deltas non-zero so the round trip checks them too
        e.delta.weight.normal_()
    path = tmp_path / "lite.pt"
    torch.save({"generator": g.state_dict(), "encoder": e.state_dict()}, path)
    g2 = load_lite_generator(path, dict(TINY))
    e2 = load_lite_encoder(path, dict(TINY, format="lite-encoder"))  # manifest keys are ignored
    assert not any(p.requires_grad for p in g2.parameters()) and not g2.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(e2(x), e(x))
        assert torch.equal(g2.synthesis(e(x)), g.synthesis(e(x)))


def test_layout_mismatches_raise(tmp_path):
    g, e = _tiny()
    good = {"generator": g.state_dict(), "encoder": e.state_dict()}
    cases = {
        "missing_key": {"generator": {k: v for k, v in g.state_dict().items() if k != "const"}},
        "extra_key": {"generator": {**g.state_dict(), "extra.weight": torch.zeros(1)}},
        "wrong_shape": {"generator": LiteGenerator({**TINY, "g_channels": [16, 16, 8]}).state_dict()},
        "no_encoder": {"generator": g.state_dict()},
    }
    for name, ckpt in cases.items():
        p = tmp_path / f"{name}.pt"
        torch.save(ckpt, p)
        loader = load_lite_encoder if name == "no_encoder" else load_lite_generator
        with pytest.raises(CheckpointLayoutError):
            loader(p, dict(TINY))
    p = tmp_path / "good.pt"
    torch.save(good, p)
    with pytest.raises(CheckpointLayoutError):  # a checkpoint of another config
        load_lite_generator(p, {**TINY, "w_dim": 16, "z_dim": 16})
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointLayoutError):
        load_lite_generator(garbage, dict(TINY))


def test_gaussian_mapping_fit_keeps_the_encoder_and_matches_the_codes():
    g, e = _tiny(1)
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = e(x)
        code, _ = e.encode_parts(x)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randn(4000, 32, generator=gen) @ torch.randn(32, 32, generator=gen) * 0.3 + 2.0
    fit_gaussian_mapping(g, e, codes)
    with torch.no_grad():
        after = e(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert torch.allclose(g.w_avg, codes.mean(0), atol=1e-4) and torch.equal(g.w_avg, e.w_avg)
    w = g.mapping(torch.randn(20000, 32, generator=gen))
    assert torch.allclose(w.mean(0), codes.mean(0), atol=0.1)
    assert torch.allclose(torch.cov(w.t()), torch.cov(codes.t()), atol=0.15 * torch.cov(codes.t()).abs().max())


class _FakeRecognizer(torch.nn.Module):
    """Narrow stand-in for the dlib net: a fixed random projection of the pixels, L2-normalised, (B, 128)."""

    embedding_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16 * 16, 128, bias=False)

    def embed(self, images: torch.Tensor, alignment: str = "dlib-chip") -> torch.Tensor:
        return torch.nn.functional.normalize(self.proj(images.flatten(1)), dim=1)


def test_identity_conditioned_encoder_reads_the_recognizer_and_keeps_it_out_of_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = {**TINY, "e_identity": 128}
    e = LiteEncoder(cfg).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with pytest.raises(RuntimeError, match="no identity model attached"):
        e(x)
    rec = _FakeRecognizer()
    e.attach_identity(rec)
    assert not any("proj.weight" == k or k.startswith("identity") for k in e.state_dict())
    w = e(x)
    # the descriptor changes the code: same pixels, another recognizer -> another W+
    feats = e.identity_features(x)
    assert feats.shape == (3, 128) and not feats.requires_grad
    assert torch.allclose(e.encode_parts(x, feats)[0], e.encode_parts(x)[0])
    assert not torch.allclose(e.encode_parts(x, torch.zeros_like(feats))[0], w[:, 0])
    # .to() reaches the attached recognizer (kept outside the module tree)
    e.double()
    assert rec.proj.weight.dtype == torch.float64
    e.float()
    path = tmp_path / "lite.pt"
    torch.save({"encoder": e.state_dict()}, path)
    with pytest.raises(CheckpointLayoutError):
        load_lite_encoder(path, dict(TINY))  # the id_proj keys are unexpected without e_identity
    with pytest.raises(CheckpointLayoutError):
        LiteEncoder({**TINY, "e_identity": 64})
    with pytest.raises(CheckpointLayoutError):
        LiteEncoder(cfg).attach_identity(torch.nn.Linear(2, 2))


# --- the committed bundle ------------------------------------------------------------------------------------------
needs_bundle = pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(), reason="lite bundle not trained yet")


@needs_bundle
def test_bundle_loads_and_hashes_verify(tmp_path):
    from worker.models.bundle import load_bundle, read_manifest

    b = load_bundle(BUNDLE, "cpu", components=["generator", "encoder"])
    assert b.generator.n_latent == 10 and b.encoder.input_size == b.generator.resolution
    m = read_manifest(BUNDLE)
    weights = BUNDLE / m["components"]["generator"]["path"]
    assert weights.stat().st_size < 30e6
    copy = tmp_path / "lite"
    shutil.copytree(BUNDLE, copy)
    data = bytearray((copy / weights.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / weights.name).write_bytes(bytes(data))
    with pytest.raises(HashMismatchError):
        load_bundle(copy, "cpu", components=["generator"])


@needs_bundle
def test_reconstruction_of_a_real_face_is_closest_to_it(smoke_faces):
    from worker.models.bundle import load_bundle
    from worker.models.dlib_face import prepare_face
    from worker.models.dlib_resnet import load_dlib_resnet

    b = load_bundle(BUNDLE, "cpu", components=["generator", "encoder"])
    r = b.encoder.input_size
    from PIL import Image

    chips = {
        k: prepare_face(np.asarray(Image.open(smoke_faces[k]).convert("RGB")), r, "dlib-chip")
        for k in ("obama", "biden")
    }
    x = {k: torch.from_numpy(v).permute(2, 0, 1)[None].float() / 127.5 - 1 for k, v in chips.items()}
    with torch.no_grad():
        rec = b.generator.synthesis(b.encoder(x["obama"]))
        assert (rec - x["obama"]).abs().mean() < (rec - x["biden"]).abs().mean()
        ident = load_dlib_resnet()
        e_rec, e_o, e_b = (ident.embed(t, "dlib-chip") for t in (rec, x["obama"], x["biden"]))
    assert (e_rec * e_o).sum() > (e_rec * e_b).sum()
