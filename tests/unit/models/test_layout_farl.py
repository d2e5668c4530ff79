"""FaRL / CLIP ViT visual tower loader against small random checkpoints in the exact OpenAI CLIP key layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.errors import CheckpointLayoutError
from worker.models.base import AttributeModel
from worker.models.farl import CLIP_MEAN, CLIP_STD, FaRLVisual, load_farl

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "golden"
torch.set_num_threads(1)


def clip_visual_state(
    width: int = 128, layers: int = 2, patch: int = 16, resolution: int = 224, out_dim: int = 64, seed: int = 0
) -> dict:
    """``visual.*`` keys of an OpenAI CLIP ViT (as FaRL saves them), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.02):
        return torch.randn(shape, generator=g) * scale

    def ln(prefix):
        s[f"{prefix}.weight"] = 1 + r(width, scale=0.1)
        s[f"{prefix}.bias"] = r(width, scale=0.1)

    s: dict[str, torch.Tensor] = {}
    s["visual.class_embedding"] = r(width, scale=width**-0.5)
    s["visual.positional_embedding"] = r((resolution // patch) ** 2 + 1, width, scale=width**-0.5)
    s["visual.proj"] = r(width, out_dim, scale=width**-0.5)
    s["visual.conv1.weight"] = r(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5)
    ln("visual.ln_pre")
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}"
        s[f"{p}.attn.in_proj_weight"] = r(3 * width, width, scale=width**-0.5)
        s[f"{p}.attn.in_proj_bias"] = r(3 * width)
        s[f"{p}.attn.out_proj.weight"] = r(width, width, scale=width**-0.5)
        s[f"{p}.attn.out_proj.bias"] = r(width)
        ln(f"{p}.ln_1")
        s[f"{p}.mlp.c_fc.weight"] = r(4 * width, width, scale=width**-0.5)
        s[f"{p}.mlp.c_fc.bias"] = r(4 * width)
        s[f"{p}.mlp.c_proj.weight"] = r(width, 4 * width, scale=(4 * width) ** -0.5)
        s[f"{p}.mlp.c_proj.bias"] = r(width)
        ln(f"{p}.ln_2")
    ln("visual.ln_post")
    return s


def farl_checkpoint(seed: int = 0) -> dict:
    """FaRL ep64 structure: ``{"state_dict": whole CLIP}`` (text tower keys included, ignored by the loader)."""
    state = clip_visual_state(seed=seed)
    state.update(
        {
            "positional_embedding": torch.zeros(77, 64),
            "text_projection": torch.zeros(64, 64),
            "logit_scale": torch.tensor(4.6),
            "transformer.resblocks.0.ln_1.weight": torch.ones(64),
            "token_embedding.weight": torch.zeros(10, 64),
            "ln_final.weight": torch.ones(64),
        }
    )
    return {"state_dict": state}


def _save(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_farl_small_loads_strictly_and_gives_197_tokens(tmp_path):
    model = load_farl(_save(tmp_path, "FaRL-Base-Patch16-LAIONFace20M-ep64.pth", farl_checkpoint()), {})
    assert isinstance(model, AttributeModel) and isinstance(model, FaRLVisual) and not model.training
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = model.tokens(images, "ffhq")
    assert tokens.shape == (2, 197, 128) and torch.isfinite(tokens).all()
    assert not torch.allclose(tokens[0], tokens[1])
    # preprocessing: [-1, 1] -> [0, 1] -> 224 antialiased bilinear -> CLIP mean/std
    x = F.interpolate((images + 1) / 2, size=224, mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(model.visual.tokens(x), tokens, atol=1e-5)
    assert model(images).shape == (2, 64)
    big = images.clone().requires_grad_(True)
    model.tokens(big, "ffhq").abs().mean().backward()
    assert big.grad.abs().sum() > 0


def test_farl_normalisation_can_be_switched_off(tmp_path):
    model = load_farl(_save(tmp_path, "f.pth", farl_checkpoint()), {"normalize": False})
    images = torch.zeros(1, 3, 224, 224)
    assert torch.allclose(model.preprocess(images), torch.full((1, 3, 224, 224), 0.5))


def test_farl_bare_state_dict(tmp_path):
    model = load_farl(_save(tmp_path, "clip.pt", clip_visual_state()), {"state_key": None})
    assert model.tokens(torch.zeros(1, 3, 224, 224), "ffhq").shape == (1, 197, 128)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("visual.transformer.resblocks.1.mlp.c_fc.bias"),
        lambda s: s.__setitem__("visual.ln_postX.weight", s.pop("visual.ln_post.weight")),
        lambda s: s.__setitem__("visual.class_embedding", torch.zeros(64)),
        lambda s: s.__setitem__("visual.transformer.resblocks.0.attn.extra", torch.zeros(1)),
        lambda s: s.pop("visual.proj"),
        lambda s: [s.pop(k) for k in list(s) if k.startswith("visual.")],
    ],
    ids=["missing", "renamed", "wrong-shape", "unexpected", "no-proj", "no-visual"],
)
def test_farl_layout_errors(tmp_path, mutate):
    ckpt = farl_checkpoint()
    mutate(ckpt["state_dict"])
    with pytest.raises(CheckpointLayoutError, match="broken.pth"):
        load_farl(_save(tmp_path, "broken.pth", ckpt), {})


def test_golden_clip_reference(tmp_path):
    path = GOLDEN / "farl_clip_visual.pt"
    if not path.is_file():
        pytest.skip("golden fixture farl_clip_visual.pt not present")
    gold = torch.load(path, weights_only=True)
    seed, img_seed = (int(v) for v in gold["config"])
    model = load_farl(_save(tmp_path, "f.pth", {"state_dict": clip_visual_state(seed=seed)}), {})
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(img_seed))
    with torch.no_grad():
        tokens = model.visual.tokens(x)
        feature = model.visual(x)
    assert (tokens[:, ::7] - gold["tokens_every_7th"]).abs().max() < 1e-4
    assert (feature - gold["feature"]).abs().max() < 1e-4


@pytest.mark.slow
def test_full_size_farl_vitb16_layout(tmp_path):
    """Production shapes: ViT-B/16, width 768, 12 layers, 12 heads, 512-D projection -> (B, 197, 768) tokens."""
    model = load_farl(_save(tmp_path, "farl.pth", {"state_dict": clip_visual_state(768, 12, 16, 224, 512)}), {})
    with torch.no_grad():
        tokens = model.tokens(torch.zeros(1, 3, 1024, 1024), "ffhq")
    assert tokens.shape == (1, 197, 768) and torch.isfinite(tokens).all()
