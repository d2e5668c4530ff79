"""e4e encoder (encoder4editing): IR-SE-50 + feature pyramid + map-to-style blocks, W+ deltas over one base w.

Checkpoint ``e4e_ffhq_encode.pt``: ``{"state_dict": {"encoder.*", "decoder.*"}, "latent_avg": (n_latent, 512),
"opts": {...}}``. Only ``encoder.*`` is loaded here (strictly); the decoder is the rosinality generator and can be
loaded as a bundle generator with ``{"state_key": "state_dict", "prefix": "decoder."}``.

Forward (input (B, 3, 256, 256) in [-1, 1], FFHQ-aligned): style block 0 maps the 16 px features to a base w; each
later block i adds a delta to row i (blocks 1-2 on the 16 px features, 3-6 on the 32 px pyramid level, 7+ on the
64 px level); finally the generator's ``latent_avg`` is added.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError
from worker.models.bundle import freeze, load_strict, read_checkpoint, strip_prefix, sub_dict
from worker.models.irse import UNITS_50, WIDTHS_50, infer_widths, make_body, make_input_layer, stage_starts
from worker.models.stylegan2 import EqualLinear

COARSE, MIDDLE = 3, 7  # first rows fed from the 32 px and the 64 px pyramid levels


class GradualStyleBlock(nn.Module):
    """Feature map (B, C, S, S) -> log2(S) stride-2 3x3 convs with leaky ReLU(0.01) -> (B, out) -> equal linear."""

    def __init__(self, in_ch: int, out_ch: int, spatial: int):
        super().__init__()
        n = int(math.log2(spatial))
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, 2, 1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_ch, out_ch)
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(x.shape[0], self.out_ch))


def _upsample_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=True) + lateral


class E4EEncoder(nn.Module):
    """Implements ``worker.models.base.Encoder``: images (B, 3, 256, 256) in [-1, 1] -> W+ (B, n_latent, w_dim)."""

    alignment = "ffhq"

    latent_avg: torch.Tensor

    def __init__(
        self, n_latent: int = 18, w_dim: int = 512, widths: tuple[int, ...] = WIDTHS_50, input_size: int = 256
    ):
        super().__init__()
        if widths[-1] != w_dim:
            raise ValueError("e4e needs the last backbone width to equal w_dim")
        self.n_latent, self.w_dim, self.input_size = n_latent, w_dim, input_size
        self.input_layer = make_input_layer(widths[0])
        self.body = make_body(widths)
        ends = stage_starts(UNITS_50)[1:] + [sum(UNITS_50)]
        self.taps = (ends[1] - 1, ends[2] - 1, ends[3] - 1)  # body indices 6, 20, 23: 64, 32, 16 px for 256 in
        s = input_size // 16
        self.styles = nn.ModuleList(
            GradualStyleBlock(widths[-1], w_dim, s if i < COARSE else 2 * s if i < MIDDLE else 4 * s)
            for i in range(n_latent)
        )
        self.latlayer1 = nn.Conv2d(widths[2], w_dim, 1)
        self.latlayer2 = nn.Conv2d(widths[1], w_dim, 1)
        self.register_buffer("latent_avg", torch.zeros(n_latent, w_dim))

    def offsets(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, input_size, input_size) -> W+ relative to ``latent_avg`` (B, n_latent, w_dim)."""
        x = self.input_layer(images)
        feats = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self.taps:
                feats.append(x)
        c1, c2, c3 = feats
        base = self.styles[0](c3)
        rows = [base]
        features, p2 = c3, None
        for i in range(1, self.n_latent):
            if i == COARSE:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == MIDDLE:
                assert p2 is not None  # set at COARSE < MIDDLE
                features = _upsample_add(p2, self.latlayer2(c1))
            rows.append(base + self.styles[i](features))
        return torch.stack(rows, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1], FFHQ-aligned (resized to input_size if H != input_size) -> W+."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return self.offsets(images) + self.latent_avg


def load_e4e(path: Path, config: dict[str, Any]) -> E4EEncoder:
    """``e4e_ffhq_encode.pt`` -> frozen ``E4EEncoder``. config: ``n_latent`` (asserted), ``allow_pickle``."""
    path = Path(path)
    ckpt = read_checkpoint(path, config)
    full = sub_dict(ckpt, "state_dict", path)
    strays = [k for k in full if not (k.startswith("encoder.") or k.startswith("decoder."))]
    if strays:
        raise CheckpointLayoutError(f"{path.name} is not an e4e checkpoint: unexpected {strays[:4]}")
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    if opts.get("encoder_type", "Encoder4Editing") != "Encoder4Editing":
        raise CheckpointLayoutError(f"{path.name}: encoder_type {opts.get('encoder_type')!r}, expected Encoder4Editing")
    state = strip_prefix(full, "encoder.")
    n_latent = len({k.split(".")[1] for k in state if k.startswith("styles.")})
    if n_latent < MIDDLE + 1:
        raise CheckpointLayoutError(f"{path.name}: {n_latent} style blocks, e4e needs at least {MIDDLE + 1}")
    if "stylegan_size" in opts and 2 * int(math.log2(int(opts["stylegan_size"]))) - 2 != n_latent:
        raise CheckpointLayoutError(
            f"{path.name}: {n_latent} style blocks do not fit stylegan_size {opts['stylegan_size']}"
        )
    if config.get("n_latent") is not None and int(config["n_latent"]) != n_latent:
        raise CheckpointLayoutError(f"{path.name}: {n_latent} style blocks, config says {config['n_latent']}")
    widths = infer_widths(state, "", path)
    lin = state.get("styles.0.linear.weight")
    if not torch.is_tensor(lin):
        raise CheckpointLayoutError(f"{path.name} is not an e4e checkpoint: missing encoder.styles.0.linear.weight")
    w_dim = int(lin.shape[0])
    n_convs = len({k.split(".")[3] for k in state if k.startswith("styles.0.convs.") and k.endswith(".weight")})
    enc = E4EEncoder(n_latent, w_dim, widths, input_size=16 * 2**n_convs)
    latent_avg = ckpt.get("latent_avg")
    if latent_avg is None:
        if opts.get("start_from_latent_avg", True):
            raise CheckpointLayoutError(f"{path.name}: missing latent_avg")
        latent_avg = torch.zeros(n_latent, w_dim)
    if (
        not torch.is_tensor(latent_avg)
        or latent_avg.shape[-1] != w_dim
        or latent_avg.numel() not in (w_dim, n_latent * w_dim)
    ):
        raise CheckpointLayoutError(f"{path.name}: latent_avg must be ({n_latent}, {w_dim}) or ({w_dim},)")
    state["latent_avg"] = latent_avg.reshape(-1, w_dim).expand(n_latent, w_dim).clone()
    load_strict(enc, state, path, "e4e encoder")
    freeze(enc)
    return enc
