"""Tiny seeded models implementing worker.models.base protocols, for fast engine tests (16 px, n_latent 8).

They are random (seeded) networks: meaningless as face models, but real style-based computations with the same
shapes, conventions and gradient paths as the production ones. No module couples samples of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

RES = 16
N_LATENT = 8
W_DIM = 16
Z_DIM = 16
EMB_DIM = 32
ALIGNMENT = "dlib-chip"


class TinyGenerator(nn.Module):
    """mapping: 2-layer MLP z (B, 16) -> w (B, 16). synthesis: W+ (B, 8, 16) -> (B, 3, 16, 16) in [-1, 1].

    Layers 0-1 modulate 4 px, 2-3 8 px, 4-5 16 px features, 6-7 the colour output (coarse -> fine, like StyleGAN).
    """

    z_dim, w_dim, n_latent, resolution, alignment = Z_DIM, W_DIM, N_LATENT, RES, ALIGNMENT

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.map1 = nn.Linear(Z_DIM, W_DIM)
        self.map2 = nn.Linear(W_DIM, W_DIM)
        self.const = nn.Parameter(torch.randn(1, 8, 4, 4, generator=g))
        self.affines = nn.ModuleList(nn.Linear(W_DIM, 8) for _ in range(N_LATENT))
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(6))
        self.to_rgb = nn.Conv2d(8, 3, 1)
        with torch.no_grad():
            for p in self.parameters():
                if p is not self.const:
                    fan_in = p[0].numel() if p.dim() > 1 else 10
                    p.copy_(torch.randn(p.shape, generator=g) * (1.4 / fan_in**0.5))
            for a in self.affines:
                a.bias.add_(1.0)
        self.register_buffer("w_avg", self.mapping(torch.randn(256, Z_DIM, generator=g)).mean(0).detach())

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return self.map2(F.leaky_relu(self.map1(z), 0.2))

    def synthesis(self, wplus: torch.Tensor) -> torch.Tensor:
        x = self.const.expand(wplus.shape[0], -1, -1, -1)
        for i, conv in enumerate(self.convs):
            if i in (2, 4):
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.leaky_relu(conv(x * self.affines[i](wplus[:, i])[:, :, None, None]), 0.2)
            x = x * torch.rsqrt(x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1e-6)  # per-sample scale, no coupling
        s = self.affines[6](wplus[:, 6]) * torch.sigmoid(self.affines[7](wplus[:, 7]))
        return torch.tanh(0.7 * self.to_rgb(x * s[:, :, None, None]))


class TinyEncoder(nn.Module):
    """(B, 3, 16, 16) in [-1, 1] -> W+ (B, 8, 16) = w_avg + head(features)."""

    input_size, alignment = RES, ALIGNMENT

    def __init__(self, w_avg: torch.Tensor, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 8 * 8, N_LATENT * W_DIM)
        self.register_buffer("w_avg", w_avg.clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv(images), 0.2).flatten(1)
        return self.w_avg + 0.5 * self.head(h).view(-1, N_LATENT, W_DIM)


class TinyIdentity(nn.Module):
    """(B, 3, H, W) -> L2-normalised (B, 32). Resizes any H, W to 16 (differentiable)."""

    embedding_dim = EMB_DIM

    def __init__(self, seed: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, EMB_DIM)

    def embed(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        if alignment != ALIGNMENT:
            raise ValueError(f"tiny identity model only knows {ALIGNMENT!r}")
        x = images if images.shape[-1] == RES else F.interpolate(images, size=(RES, RES), mode="bilinear")
        x = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return F.normalize(self.fc(x.flatten(1)), dim=-1)


class TinyAttribute(nn.Module):
    """(B, 3, H, W) -> tokens (B, 16, 8): 4x4 patches linearly embedded (a ViT's tokenizer, no blocks)."""

    def __init__(self, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)

    def tokens(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        x = images if images.shape[-1] == RES else F.interpolate(images, size=(RES, RES), mode="bilinear")
        return self.patch(x).flatten(2).transpose(1, 2)


@dataclass
class TinyBundle:
    """Looks like worker.models.bundle.ModelBundle to the engine."""

    generator: TinyGenerator
    encoder: TinyEncoder
    identity: TinyIdentity | LinearIdentity
    attribute: TinyAttribute | None
    bundle_id: str = "tiny-test"
    hashes: dict[str, str] = field(default_factory=dict)


def tiny_bundle(
    with_attribute: bool = True, dtype: torch.dtype = torch.float32, linear_identity: bool = False
) -> TinyBundle:
    gen = TinyGenerator()
    identity: TinyIdentity | LinearIdentity = LinearIdentity() if linear_identity else TinyIdentity()
    bundle = TinyBundle(gen, TinyEncoder(gen.w_avg), identity, TinyAttribute() if with_attribute else None)
    for m in (bundle.generator, bundle.encoder, bundle.identity, bundle.attribute):
        if m is not None:
            m.to(dtype).eval().requires_grad_(False)
    return bundle


def tiny_faces(n: int, seed: int) -> torch.Tensor:
    """Smooth random "faces" (n, 3, 16, 16) in [-1, 1], seeded."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return torch.tanh(F.interpolate(low, size=(RES, RES), mode="bilinear", align_corners=False))


def person_faces(n: int, person: int, jitter: float = 0.15, seed: int = 0) -> torch.Tensor:
    """n images of one synthetic "person": a fixed base image plus small seeded per-image noise. (n, 3, 16, 16)."""
    base = tiny_faces(1, 1000 + person)
    g = torch.Generator().manual_seed(seed * 7919 + person)
    noise = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(RES, RES), mode="bilinear")
    return (base + jitter * noise).clamp(-1.0, 1.0)


class LinearIdentity(nn.Module):
    """A discriminative stand-in recognizer for ``person_faces``: normalise(W (x - mean(x))), W random (32, 768).

    Different synthetic persons get near-orthogonal embeddings, images of one person close ones (TinyIdentity is
    not discriminative enough to measure verification with).
    """

    embedding_dim = EMB_DIM

    def __init__(self, seed: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(EMB_DIM, 3 * RES * RES, generator=g) / (3 * RES * RES) ** 0.5)

    def embed(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        x = images if images.shape[-1] == RES else F.interpolate(images, size=(RES, RES), mode="bilinear")
        x = x.flatten(1)
        return F.normalize((x - x.mean(1, keepdim=True)) @ self.weight.T, dim=-1)
