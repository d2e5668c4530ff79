"""e4e encoder loader against small random checkpoints in the exact ``e4e_ffhq_encode.pt`` layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_layout_arcface import irse_state
from test_layout_stylegan2 import rosinality_state

from worker.errors import CheckpointLayoutError
from worker.models.base import Encoder
from worker.models.e4e import E4EEncoder, load_e4e

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden"
NARROW = (16, 32, 64, 128)
torch.set_num_threads(1)


def e4e_encoder_state(widths: tuple[int, ...], n_styles: int, seed: int = 0, input_size: int = 256) -> dict:
    """``encoder.*`` keys of an Encoder4Editing (IR-SE-50, ``w_dim = widths[-1]``), random values."""
    g = torch.Generator().manual_seed(seed)
    s = irse_state(widths, g, prefix="encoder.")
    w = widths[-1]
    base = input_size // 16
    for i in range(n_styles):
        spatial = base if i < 3 else 2 * base if i < 7 else 4 * base
        n = spatial.bit_length() - 1
        for j in range(n):
            s[f"encoder.styles.{i}.convs.{2 * j}.weight"] = torch.randn(w, w, 3, 3, generator=g) * (2 / (9 * w)) ** 0.5
            s[f"encoder.styles.{i}.convs.{2 * j}.bias"] = 0.01 * torch.randn(w, generator=g)
        s[f"encoder.styles.{i}.linear.weight"] = torch.randn(w, w, generator=g)
        s[f"encoder.styles.{i}.linear.bias"] = 0.01 * torch.randn(w, generator=g)
    s["encoder.latlayer1.weight"] = torch.randn(w, widths[2], 1, 1, generator=g) * (1 / widths[2]) ** 0.5
    s["encoder.latlayer1.bias"] = 0.01 * torch.randn(w, generator=g)
    s["encoder.latlayer2.weight"] = torch.randn(w, widths[1], 1, 1, generator=g) * (1 / widths[1]) ** 0.5
    s["encoder.latlayer2.bias"] = 0.01 * torch.randn(w, generator=g)
    return s


def e4e_checkpoint(widths=NARROW, n_styles: int = 8, seed: int = 0) -> dict:
    """The whole ``e4e_ffhq_encode.pt`` structure: state_dict (encoder + decoder), latent_avg (n, w), opts."""
    w = widths[-1]
    size = 2 ** ((n_styles + 2) // 2)
    state = e4e_encoder_state(widths, n_styles, seed)
    chans = {4 * 2**i: 8 for i in range(n_styles // 2)}
    state.update({f"decoder.{k}": v for k, v in rosinality_state(size, w, 2, chans, seed).items()})
    latent_avg = (0.2 * torch.randn(w, generator=torch.Generator().manual_seed(seed + 1))).repeat(n_styles, 1)
    opts = {
        "encoder_type": "Encoder4Editing",
        "stylegan_size": size,
        "start_from_latent_avg": True,
        "checkpoint_path": None,
        "lpips_lambda": 0.8,
    }
    return {"state_dict": state, "latent_avg": latent_avg, "opts": opts}


def _save(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_e4e_small_loads_strictly_and_encodes(tmp_path):
    ckpt = e4e_checkpoint()
    enc = load_e4e(_save(tmp_path, "e4e_ffhq_encode.pt", ckpt), {"n_latent": 8})
    assert isinstance(enc, Encoder) and isinstance(enc, E4EEncoder)
    assert (enc.input_size, enc.alignment, enc.n_latent, enc.w_dim) == (256, "ffhq", 8, 128)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    wplus = enc(images)
    assert wplus.shape == (2, 8, 128) and torch.isfinite(wplus).all()
    # e4e structure: latent_avg added to one base w plus per-row deltas
    offsets = enc.offsets(images)
    assert torch.allclose(wplus, offsets + ckpt["latent_avg"], atol=1e-5)
    assert not torch.allclose(offsets[:, 0], offsets[:, 5])
    assert not torch.allclose(wplus[0], wplus[1])
    # other sizes are resized (antialiased bilinear) to 256 first
    big = torch.nn.functional.interpolate(images, size=512, mode="nearest")
    small = torch.nn.functional.interpolate(big, size=256, mode="bilinear", antialias=True)
    assert torch.allclose(enc(big), enc(small), atol=1e-5)


def test_e4e_flat_latent_avg_is_broadcast(tmp_path):
    ckpt = e4e_checkpoint()
    ckpt["latent_avg"] = ckpt["latent_avg"][0]
    enc = load_e4e(_save(tmp_path, "e.pt", ckpt), {})
    assert torch.equal(enc.latent_avg, ckpt["latent_avg"].expand(8, -1))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["state_dict"].pop("encoder.styles.7.convs.8.weight"),
        lambda c: c["state_dict"].__setitem__(
            "encoder.latlayerX.weight", c["state_dict"].pop("encoder.latlayer1.weight")
        ),
        lambda c: c["state_dict"].__setitem__("encoder.latlayer2.weight", torch.zeros(128, 16, 1, 1)),
        lambda c: c["state_dict"].__setitem__("encoder.extra", torch.zeros(1)),
        lambda c: c["state_dict"].__setitem__("discriminator.w", torch.zeros(1)),
        lambda c: c.pop("latent_avg"),
        lambda c: c.__setitem__("latent_avg", torch.zeros(5, 128)),
        lambda c: c["opts"].__setitem__("encoder_type", "GradualStyleEncoder"),
        lambda c: c["opts"].__setitem__("stylegan_size", 1024),
        lambda c: c.pop("state_dict"),
    ],
    ids=[
        "missing",
        "renamed",
        "wrong-shape",
        "unexpected",
        "stray-prefix",
        "no-latent-avg",
        "bad-latent-avg",
        "psp",
        "size-mismatch",
        "no-state-dict",
    ],
)
def test_e4e_layout_errors(tmp_path, mutate):
    ckpt = e4e_checkpoint()
    mutate(ckpt)
    with pytest.raises(CheckpointLayoutError, match="broken.pt"):
        load_e4e(_save(tmp_path, "broken.pt", ckpt), {})


def test_golden_e4e_reference(tmp_path):
    path = GOLDEN / "e4e.pt"
    if not path.is_file():
        pytest.skip("golden fixture e4e.pt not present")
    gold = torch.load(path, weights_only=True)
    n_styles, seed, img_seed = (int(v) for v in gold["config"])
    state = e4e_encoder_state((64, 128, 256, 512), n_styles, seed)
    ckpt = {"state_dict": state, "latent_avg": gold["latent_avg"], "opts": {"encoder_type": "Encoder4Editing"}}
    enc = load_e4e(_save(tmp_path, "e.pt", ckpt), {})
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(img_seed)) * 2 - 1
    with torch.no_grad():
        wplus = enc(images)
    assert (wplus - gold["wplus"]).abs().max() < 1e-4


@pytest.mark.slow
def test_full_size_e4e_ffhq_encode_layout(tmp_path):
    """Production shapes: IR-SE-50 (64..512), 18 style blocks, latent_avg (18, 512), 256 px input."""
    ckpt = {
        "state_dict": e4e_encoder_state((64, 128, 256, 512), 18),
        "latent_avg": torch.zeros(18, 512),
        "opts": {"encoder_type": "Encoder4Editing", "stylegan_size": 1024, "start_from_latent_avg": True},
    }
    enc = load_e4e(_save(tmp_path, "e4e_ffhq_encode.pt", ckpt), {"n_latent": 18})
    with torch.no_grad():
        wplus = enc(torch.zeros(1, 3, 256, 256))
    assert wplus.shape == (1, 18, 512) and torch.isfinite(wplus).all()
