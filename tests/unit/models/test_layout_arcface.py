"""ArcFace IR-SE-50 loader against small random checkpoints in the exact ``model_ir_se50.pth`` layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.errors import CheckpointLayoutError
from worker.models.arcface import ArcFaceIRSE50, load_arcface
from worker.models.base import IdentityModel
from worker.models.irse import unit_plan

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden"
NARROW = (16, 32, 64, 128)
torch.set_num_threads(1)


def _bn(s: dict, prefix: str, n: int, g: torch.Generator, affine: bool = True) -> None:
    if affine:
        s[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        s[f"{prefix}.bias"] = 0.1 * torch.randn(n, generator=g)
    s[f"{prefix}.running_mean"] = 0.1 * torch.randn(n, generator=g)
    s[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(n, generator=g)
    s[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def _conv(g: torch.Generator, cout: int, cin: int, k: int) -> torch.Tensor:
    return torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5


def irse_state(widths: tuple[int, ...], g: torch.Generator, prefix: str = "") -> dict:
    """``input_layer.*`` and ``body.*`` of an IR-SE-50 in TreB1eN's key names (BatchNorm stats included)."""
    s: dict[str, torch.Tensor] = {}
    s[f"{prefix}input_layer.0.weight"] = _conv(g, widths[0], 3, 3)
    _bn(s, f"{prefix}input_layer.1", widths[0], g)
    s[f"{prefix}input_layer.2.weight"] = 0.25 + 0.05 * torch.randn(widths[0], generator=g)
    for i, (cin, depth, _stride) in enumerate(unit_plan(widths)):
        p = f"{prefix}body.{i}"
        if cin != depth:
            s[f"{p}.shortcut_layer.0.weight"] = _conv(g, depth, cin, 1)
            _bn(s, f"{p}.shortcut_layer.1", depth, g)
        _bn(s, f"{p}.res_layer.0", cin, g)
        s[f"{p}.res_layer.1.weight"] = _conv(g, depth, cin, 3)
        s[f"{p}.res_layer.2.weight"] = 0.25 + 0.05 * torch.randn(depth, generator=g)
        s[f"{p}.res_layer.3.weight"] = _conv(g, depth, depth, 3) * 0.3
        _bn(s, f"{p}.res_layer.4", depth, g)
        s[f"{p}.res_layer.5.fc1.weight"] = _conv(g, depth // 16, depth, 1)
        s[f"{p}.res_layer.5.fc2.weight"] = _conv(g, depth, depth // 16, 1)
    return s


def arcface_state(
    widths: tuple[int, ...] = NARROW, emb: int = 32, affine: bool = True, seed: int = 0, old_torch: bool = False
) -> dict:
    """A ``model_ir_se50.pth``-layout state dict; ``old_torch`` drops num_batches_tracked (pre-0.4.1 saves)."""
    g = torch.Generator().manual_seed(seed)
    s = irse_state(widths, g)
    _bn(s, "output_layer.0", widths[-1], g)
    s["output_layer.3.weight"] = torch.randn(emb, widths[-1] * 49, generator=g) * (1.0 / (widths[-1] * 49)) ** 0.5
    s["output_layer.3.bias"] = 0.1 * torch.randn(emb, generator=g)
    _bn(s, "output_layer.4", emb, g, affine=affine)
    if old_torch:
        s = {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")}
    return s


def _save(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


@pytest.mark.parametrize("affine,old", [(True, False), (False, True)])
def test_arcface_small_loads_strictly_and_embeds(tmp_path, affine, old):
    path = _save(tmp_path, "model_ir_se50.pth", arcface_state(affine=affine, old_torch=old))
    model = load_arcface(path, {})
    assert isinstance(model, IdentityModel) and isinstance(model, ArcFaceIRSE50)
    assert model.embedding_dim == 32 and model.input_size == 112 and not model.training
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 256, 256, generator=g) * 2 - 1
    emb = model.embed(images, "ffhq")
    assert emb.shape == (3, 32) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)
    # the documented input convention: resize to 256, crop [35:223, 32:220], pool to 112
    crop = torch.nn.functional.adaptive_avg_pool2d(images[:, :, 35:223, 32:220], 112)
    assert torch.allclose(model(crop), emb, atol=1e-6)
    # a 1024 px generator image is resized to 256 first; gradients reach the image
    big = torch.nn.functional.interpolate(images, size=512, mode="bilinear").requires_grad_(True)
    out = model.embed(big, "ffhq")
    assert out.shape == (3, 32)
    out.sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0


def test_arcface_other_alignment_goes_through_warp(tmp_path, monkeypatch):
    model = load_arcface(_save(tmp_path, "a.pth", arcface_state()), {})
    calls = []
    import worker.models.alignment as alignment

    def fake_warp(images, src, dst, out_size):
        calls.append((src, dst, out_size))
        return torch.nn.functional.interpolate(images, size=out_size, mode="bilinear")

    monkeypatch.setattr(alignment, "warp", fake_warp)
    out = model.embed(torch.zeros(1, 3, 128, 128), "dlib-chip")
    assert calls == [("dlib-chip", "ffhq", 256)] and out.shape == (1, 32)


def test_arcface_dataparallel_prefix_is_tolerated(tmp_path):
    state = {f"module.{k}": v for k, v in arcface_state().items()}
    assert load_arcface(_save(tmp_path, "dp.pth", state), {}).embedding_dim == 32


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("body.5.res_layer.5.fc1.weight"),
        lambda s: s.__setitem__("body.5.res_layer.5.fcX.weight", s.pop("body.5.res_layer.5.fc1.weight")),
        lambda s: s.__setitem__("output_layer.3.weight", torch.zeros(32, 100)),
        lambda s: s.__setitem__("output_layer.5.weight", torch.zeros(3)),
        lambda s: s.pop("input_layer.0.weight"),
    ],
    ids=["missing", "renamed", "wrong-shape", "unexpected", "no-stem"],
)
def test_arcface_layout_errors(tmp_path, mutate):
    state = arcface_state()
    mutate(state)
    with pytest.raises(CheckpointLayoutError, match="broken.pth"):
        load_arcface(_save(tmp_path, "broken.pth", state), {})


def test_arcface_rejects_non_state_dict(tmp_path):
    with pytest.raises(CheckpointLayoutError):
        load_arcface(_save(tmp_path, "x.pth", [1, 2, 3]), {})


def test_golden_arcface_reference(tmp_path):
    path = GOLDEN / "arcface_irse50.pt"
    if not path.is_file():
        pytest.skip("golden fixture arcface_irse50.pt not present")
    gold = torch.load(path, weights_only=True)
    seed, img_seed = (int(v) for v in gold["config"])
    model = load_arcface(_save(tmp_path, "g.pth", arcface_state((64, 128, 256, 512), 512, seed=seed)), {})
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(img_seed)) * 2 - 1
    with torch.no_grad():
        emb = model.embed(images, "ffhq")
    assert (emb - gold["embedding"]).abs().max() < 1e-4


@pytest.mark.slow
def test_full_size_model_ir_se50_layout(tmp_path):
    """Production shapes: widths 64..512, Linear(512*7*7, 512), affine BatchNorm1d; 1024 px FFHQ input."""
    model = load_arcface(_save(tmp_path, "model_ir_se50.pth", arcface_state((64, 128, 256, 512), 512)), {})
    assert sum(p.numel() for p in model.parameters()) > 40_000_000
    with torch.no_grad():
        emb = model.embed(torch.zeros(1, 3, 1024, 1024), "ffhq")
    assert emb.shape == (1, 512)
