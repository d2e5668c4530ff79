"""The interfaces every model family implements, so the engine cannot tell lite from StyleGAN2 apart.

Conventions (all networks):
- images are float tensors (B, 3, H, W), RGB, values in [-1, 1];
- a W+ code is (B, n_latent, w_dim), float32;
- every module is an ``nn.Module`` in eval mode with frozen parameters once loaded.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Generator(Protocol):
    """Style-based generator: z -> w (mapping), W+ -> image (synthesis)."""

    z_dim: int
    w_dim: int
    n_latent: int  # number of W+ style layers (18 for StyleGAN2 at 1024 px)
    resolution: int  # output side in pixels
    alignment: str  # crop convention of the output, e.g. "ffhq" or "dlib-chip"
    w_avg: torch.Tensor  # (w_dim,) mean of mapping(z), the truncation centre

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) -> w (B, w_dim)."""
        ...

    def synthesis(self, wplus: torch.Tensor) -> torch.Tensor:
        """W+ (B, n_latent, w_dim) -> image (B, 3, resolution, resolution) in [-1, 1], fixed noise."""
        ...


@runtime_checkable
class Encoder(Protocol):
    """Image -> W+ inversion (e4e or the lite encoder). Adds the generator's latent average itself."""

    input_size: int  # side of the square aligned crop it expects
    alignment: str  # crop convention of its input

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, input_size, input_size) in [-1, 1] -> W+ (B, n_latent, w_dim)."""
        ...


@runtime_checkable
class IdentityModel(Protocol):
    """Differentiable face recognizer used INSIDE the loss (never to judge results)."""

    embedding_dim: int

    def embed(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        """Generator-convention images (B, 3, H, W) in [-1, 1] -> L2-normalised embeddings (B, embedding_dim).

        ``alignment`` names the crop convention of ``images``; the model maps it to its own input crop with a
        differentiable warp/resize.
        """
        ...


@runtime_checkable
class AttributeModel(Protocol):
    """Token features for the attribute loss (FaRL ViT-B/16 in production)."""

    def tokens(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, T, C) before the final layer norm."""
        ...
