"""scripts/finetune_generator.py: the differentiable augmentation and the delta export, round trip through the
bundle's DCGAN loader (a generator component's ``config.delta``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "finetune_generator.py"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ft():
    spec = importlib.util.spec_from_file_location("finetune_generator", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_translation_shifts_by_whole_pixels_and_cutout_zeroes_a_square(ft) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) + 0.5  # strictly positive: zeros can only come from the fill
    y = ft.augment(x, {"translation"})
    for i in range(6):  # each sample equals the input shifted by some (dy, dx) with |d| <= 2, zero filled
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x[i])
                ys, yd = slice(max(0, dy), 16 + min(0, dy)), slice(max(0, -dy), 16 + min(0, -dy))
                xs, xd = slice(max(0, dx), 16 + min(0, dx)), slice(max(0, -dx), 16 + min(0, -dx))
                ref[:, ys, xs] = x[i][:, yd, xd]
                found |= torch.equal(y[i], ref)
        assert found
    z = ft.augment(x, {"cutout"})
    zeros = (z == 0).all(dim=1)  # (B, H, W)
    assert all(0 < int(zeros[i].sum()) <= 64 for i in range(6))  # at most a half-side (8 x 8) square per sample
    assert torch.equal(z[~(z == 0)], x[~(z == 0)])


def test_augment_is_differentiable_and_per_sample(ft) -> None:
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    y = ft.augment(x * 2 - 1, {"color", "translation", "cutout"})
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    same = ft.augment(torch.zeros(4, 3, 16, 16) + 0.3, {"color"})
    assert not torch.allclose(same[0], same[1])  # an independent draw per sample


def test_discriminator_shapes(ft) -> None:
    for sn in (True, False):
        d = ft.Discriminator(ndf=8, sn=sn)
        assert d(torch.zeros(3, 3, 64, 64)).shape == (3,)


@pytest.mark.skipif(
    importlib.util.find_spec("gan_face_generate") is None,
    reason="gan-face-generate not installed (scripts/bootstrap.sh installs it with --no-deps)",
)
def test_exported_delta_reproduces_the_snapshot_through_the_bundle_loader(ft, tmp_path: Path) -> None:
    from worker.models.bundle import resolve_path
    from worker.models.dcgan import load_dcgan

    base_path = resolve_path(ft.REPO, ft.DCGAN_PATH)
    base = load_dcgan(base_path).state_dict()
    g = torch.Generator().manual_seed(2)
    tuned = {
        k: (v + 0.01 * torch.randn(v.shape, generator=g) if k == "main.6.weight" else v.clone())
        for k, v in base.items()
    }
    torch.save({"ema": tuned, "step": 7, "args": {"lr_g": 5e-5}}, tmp_path / "ema_000007.pt")
    meta = ft.export_delta(tmp_path / "ema_000007.pt", tmp_path / "delta.pt")
    assert meta["step"] == 7 and "non-commercial" in meta["licence"]
    saved = torch.load(tmp_path / "delta.pt", weights_only=True)
    assert set(saved["delta"]) == {"main.6.weight"}  # unchanged tensors are left out
    got = load_dcgan(base_path, {"delta": {"path": str(tmp_path / "delta.pt")}}).state_dict()
    err = (got["main.6.weight"] - tuned["main.6.weight"]).abs().max()
    moved = (tuned["main.6.weight"] - base["main.6.weight"]).abs().max()
    assert err < 1e-3 * moved  # float16 rounding of the difference only
    assert torch.equal(got["main.3.weight"], base["main.3.weight"])
