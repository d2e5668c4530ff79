"""FaRL ViT-B/16: the visual tower of OpenAI CLIP with FaRL's face-pretrained weights (attribute features).

Checkpoint ``FaRL-Base-Patch16-LAIONFace20M-ep64.pth``: ``{"state_dict": {...}}`` holding a whole CLIP model; only
the ``visual.*`` keys are used (all of them, strictly): ``visual.conv1.weight`` (W, 3, 16, 16),
``visual.class_embedding`` (W,), ``visual.positional_embedding`` (1 + (224/16)^2, W), ``visual.ln_pre.*``,
``visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}``, ``visual.ln_post.*``, ``visual.proj`` (W, D). Heads = W / 64 (as CLIP builds it).

``tokens(images, alignment)``: [-1, 1] -> [0, 1] -> bilinear (antialiased) resize to 224 -> CLIP mean/std
normalisation (configurable) -> (B, 197, W) tokens after the last block, before ``ln_post``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError
from worker.models.bundle import freeze, load_strict, read_checkpoint, strip_prefix, sub_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SelfAttention(nn.Module):
    """Multi-head self-attention with CLIP's packed projection names (``in_proj_weight`` (3W, W), ``out_proj``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, W) -> (B, T, W)."""
        b, t, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (y.reshape(b, t, self.heads, w // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x)) with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP visual tower: patchify conv, class token, positions, ln_pre, blocks, ln_post, projection."""

    def __init__(
        self,
        input_resolution: int = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        output_dim: int = 512,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, R, R) -> tokens (B, 1 + (R/p)^2, W) after the last block, before ln_post."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid^2, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> projected class embedding (B, output_dim) (CLIP's image feature)."""
        return self.ln_post(self.tokens(x)[:, 0]) @ self.proj


class FaRLVisual(nn.Module):
    """Implements ``worker.models.base.AttributeModel`` around the CLIP visual tower (keys under ``visual.``)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, visual: VisionTransformer, normalize: bool = True):
        super().__init__()
        self.visual = visual
        self.input_size = visual.input_resolution
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).reshape(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, 3, 224, 224) network input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = (images + 1) / 2
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return (x - self.mean) / self.std if self.normalize else x

    def tokens(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, 197, 768) tokens before ``ln_post``.

        ``alignment`` is accepted for the protocol; FaRL was trained on loose face crops of any convention, and the
        attribute loss compares two images of the same convention, so the crop is only resized.
        """
        return self.visual.tokens(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(self.preprocess(images))


def load_farl(path: Path, config: dict[str, Any]) -> FaRLVisual:
    """FaRL ep64 (or any CLIP ViT checkpoint with ``visual.*`` keys) -> frozen ``FaRLVisual``.

    config: ``state_key`` (default ``"state_dict"``; ``null`` for a bare state dict), ``normalize`` (CLIP mean/std,
    default true), ``allow_pickle``. Non-visual keys (text tower, logit scale) are ignored; visual keys load strictly.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, config)
    key = config.get("state_key", "state_dict")
    state = sub_dict(ckpt, key, path) if key else ckpt
    if not isinstance(state, dict):
        raise CheckpointLayoutError(f"{path.name} is not a CLIP state dict")
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")
    vis = strip_prefix(state, "visual.")
    if not vis:
        raise CheckpointLayoutError(f"{path.name}: no visual.* keys (not a CLIP/FaRL checkpoint)")
    for k in ("conv1.weight", "positional_embedding", "proj"):
        if not torch.is_tensor(vis.get(k)):
            raise CheckpointLayoutError(f"{path.name} is not a CLIP ViT checkpoint: missing visual.{k}")
    width, _, patch, _ = vis["conv1.weight"].shape
    grid = round((vis["positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({m[1] for k in vis if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    if width % 64:
        raise CheckpointLayoutError(f"{path.name}: width {width} is not a multiple of 64 (CLIP uses width/64 heads)")
    visual = VisionTransformer(grid * patch, patch, width, layers, width // 64, vis["proj"].shape[1])
    model = FaRLVisual(visual, normalize=bool(config.get("normalize", True)))
    load_strict(model, {f"visual.{k}": v for k, v in vis.items()}, path, "CLIP ViT visual tower")
    freeze(model)
    return model
