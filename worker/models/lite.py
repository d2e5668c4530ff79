"""The embedded "lite" model family: a small style-based generator and its encoder, trained on lfw-dev.

Both work on "dlib-chip" crops (``dlib.get_face_chip(img, shape, size=R, padding=0.25)``) at R = ``resolution``.

Generator (StyleGAN2-like, no noise inputs):
- a learned constant 4x4 input, then per resolution 8, 16, ..., R one upsampling modulated conv and one modulated
  conv, each followed by a modulated 1x1 toRGB (skip architecture). Modulation + demodulation are done on the
  activations (``x * s`` before a shared-weight conv, ``* d`` after), which equals the weight-modulated form.
- W+ has ``n_latent = 2 * log2(R) - 2`` style vectors (10 at 64 px): index 0 = 4x4 conv, 1 = first toRGB, then
  for the block at resolution 2^(k+2): 2k-1 = upsampling conv, 2k = conv, 2k+1 = toRGB (shared with the next
  block's upsampling conv, as in StyleGAN2). Coarse layers (0-2, 4-8 px) carry pose and face shape, fine layers
  (5+, 32-64 px) texture and colour.

"Mapping": the lite model has no trained z -> w network. After training, a Gaussian is fitted to the encoder's base
codes on the training images: ``mapping(z) = w_avg + z @ L.T`` with L the Cholesky factor of their covariance, so
``w_avg`` (the mean) is the truncation centre and key-derived z ~ N(0, I) land where real faces' codes are.

Encoder (e4e-like): a residual conv trunk to 4x4 and two linear heads: W+ = w_avg + base (broadcast over layers)
+ delta, with delta of layer 0 fixed to zero and kept small by a training penalty. With ``e_identity = 128`` the
hidden layer also receives the input's dlib face descriptor (a frozen, pretrained recognizer, as pSp/e4e start
from a pretrained ArcFace backbone): a small network trained on a few thousand faces cannot learn identity features
that generalise to people it never saw, the recognizer already has them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError

ALIGNMENT = "dlib-chip"

_M = TypeVar("_M", bound=nn.Module)

DEFAULT_CONFIG: dict = {
    "resolution": 64,
    "w_dim": 256,
    "z_dim": 256,
    # channels per resolution 4, 8, 16, 32, 64, 128 (only the first log2(R) - 1 are used)
    "g_channels": [160, 160, 128, 64, 32, 16],
    "e_channels": [32, 64, 96, 128, 160, 160],
    "e_hidden": 256,
    # 0: the encoder sees only pixels; 128: it also reads the frozen dlib face descriptor of its input (see
    # LiteEncoder), loaded from the installed face_recognition_models package, never stored in the lite checkpoint
    "e_identity": 0,
}


def full_config(config: dict | None) -> dict:
    """Defaults overridden by ``config`` (unknown keys are rejected)."""
    cfg = dict(DEFAULT_CONFIG)
    for k, v in (config or {}).items():
        if k in ("format", "path", "sha256"):
            continue
        if k not in DEFAULT_CONFIG:
            raise CheckpointLayoutError(f"unknown lite config key: {k}")
        cfg[k] = v
    log = int(math.log2(cfg["resolution"]))
    if 2**log != cfg["resolution"] or not 3 <= log <= 7:
        raise CheckpointLayoutError(f"lite resolution must be a power of two in 8..128, got {cfg['resolution']}")
    if len(cfg["g_channels"]) < log - 1 or len(cfg["e_channels"]) < log - 1:
        raise CheckpointLayoutError("lite config: too few channel entries for the resolution")
    return cfg


def n_latent_for(resolution: int) -> int:
    return 2 * int(math.log2(resolution)) - 2


class ModConv(nn.Module):
    """Modulated (optionally demodulated) conv with equalised learning rate.

    x (B, Cin, H, W), w (B, w_dim) -> (B, Cout, H', W'); H' = 2H when ``up``.
    """

    def __init__(self, cin: int, cout: int, k: int, w_dim: int, demod: bool = True, up: bool = False, act: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.affine = nn.Linear(w_dim, cin)
        nn.init.zeros_(self.affine.weight)
        nn.init.ones_(self.affine.bias)
        self.affine_scale = 1.0  # affine uses standard init-scale: weights start at zero, bias 1
        self.scale = 1.0 / math.sqrt(cin * k * k)
        self.demod, self.up, self.act, self.pad = demod, up, act, k // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # (B, Cin)
        x = x * s[:, :, None, None]
        wt = self.weight * self.scale
        y = F.conv2d(x, wt, padding=self.pad)
        if self.demod:
            d = torch.rsqrt((s * s) @ wt.pow(2).sum(dim=(2, 3)).t() + 1e-8)  # (B, Cout)
            y = y * d[:, :, None, None]
        if self.up:  # conv at the low resolution, then upsample: 4x cheaper on CPU; the next conv adds detail
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = y + self.bias[None, :, None, None]
        if self.act:
            y = F.leaky_relu(y, 0.2) * math.sqrt(2.0)
        return y


class LiteGenerator(nn.Module):
    """Style-based generator. ``synthesis``: W+ (B, n_latent, w_dim) -> image (B, 3, R, R) in [-1, 1]."""

    alignment = ALIGNMENT

    w_avg: torch.Tensor
    map_chol: torch.Tensor

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = full_config(config)
        self.config = cfg
        self.resolution = cfg["resolution"]
        self.w_dim = cfg["w_dim"]
        self.z_dim = cfg["z_dim"]
        if self.z_dim != self.w_dim:
            raise CheckpointLayoutError("lite generator: the Gaussian mapping needs z_dim == w_dim")
        log = int(math.log2(self.resolution))
        self.n_latent = n_latent_for(self.resolution)
        ch = cfg["g_channels"][: log - 1]
        self.const = nn.Parameter(torch.randn(1, ch[0], 4, 4))
        self.conv0 = ModConv(ch[0], ch[0], 3, self.w_dim)
        self.rgb0 = ModConv(ch[0], 3, 1, self.w_dim, demod=False, act=False)
        self.convs_up = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.rgbs = nn.ModuleList()
        for i in range(1, len(ch)):
            self.convs_up.append(ModConv(ch[i - 1], ch[i], 3, self.w_dim, up=True))
            self.convs.append(ModConv(ch[i], ch[i], 3, self.w_dim))
            self.rgbs.append(ModConv(ch[i], 3, 1, self.w_dim, demod=False, act=False))
        self.register_buffer("w_avg", torch.zeros(self.w_dim))
        self.register_buffer("map_chol", torch.eye(self.w_dim))

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) -> w (B, w_dim) = w_avg + L z (the Gaussian fitted to the encoder's codes)."""
        return self.w_avg + z @ self.map_chol.t()

    def synthesis(self, wplus: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """W+ (B, n_latent, w_dim) -> image (B, 3, R, R); clamped to [-1, 1] unless ``clamp=False`` (training)."""
        if wplus.dim() != 3 or wplus.shape[1] != self.n_latent or wplus.shape[2] != self.w_dim:
            raise ValueError(f"expected W+ of shape (B, {self.n_latent}, {self.w_dim}), got {tuple(wplus.shape)}")
        x = self.const.expand(wplus.shape[0], -1, -1, -1)
        x = self.conv0(x, wplus[:, 0])
        rgb = self.rgb0(x, wplus[:, 1])
        for k, (cu, c, tr) in enumerate(zip(self.convs_up, self.convs, self.rgbs, strict=True), start=1):
            x = cu(x, wplus[:, 2 * k - 1])
            x = c(x, wplus[:, 2 * k])
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False) + tr(x, wplus[:, 2 * k + 1])
        return rgb.clamp(-1.0, 1.0) if clamp else rgb

    def forward(self, wplus: torch.Tensor) -> torch.Tensor:
        return self.synthesis(wplus)


class _ResDown(nn.Module):
    """Residual block halving the resolution: (B, cin, H, W) -> (B, cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int, light: bool = False):
        super().__init__()
        self.c1 = nn.Identity() if light else nn.Conv2d(cin, cin, 3, padding=1)
        self.c2 = nn.Conv2d(cin, cout, 3, padding=1, stride=2)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.light = light

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.light else F.leaky_relu(self.c1(x), 0.2)
        y = F.leaky_relu(self.c2(y), 0.2)
        return (y + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2.0)


class LiteEncoder(nn.Module):
    """images (B, 3, R, R) in [-1, 1], dlib-chip -> W+ (B, n_latent, w_dim) = w_avg + base + delta."""

    alignment = ALIGNMENT

    w_avg: torch.Tensor

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = full_config(config)
        self.config = cfg
        self.input_size = cfg["resolution"]
        self.w_dim = cfg["w_dim"]
        log = int(math.log2(self.input_size))
        self.n_latent = n_latent_for(self.input_size)
        ch = cfg["e_channels"][: log - 1]
        self.from_rgb = nn.Conv2d(3, ch[0], 3, padding=1)
        # no extra conv in the blocks at the two highest resolutions (CPU cost)
        self.blocks = nn.Sequential(*[_ResDown(ch[i], ch[i + 1], light=i < 2) for i in range(len(ch) - 2)])
        self.last = _ResDown(ch[-2], ch[-1])  # -> 4x4
        self.fc = nn.Linear(ch[-1] * 16, cfg["e_hidden"])
        self.base = nn.Linear(cfg["e_hidden"], self.w_dim)
        self.delta = nn.Linear(cfg["e_hidden"], (self.n_latent - 1) * self.w_dim)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)
        self.register_buffer("w_avg", torch.zeros(self.w_dim))
        self.identity_dim = int(cfg["e_identity"])
        if self.identity_dim not in (0, 128):
            raise CheckpointLayoutError(f"lite encoder: e_identity must be 0 or 128, got {self.identity_dim}")
        self.id_proj = nn.Linear(self.identity_dim, cfg["e_hidden"]) if self.identity_dim else None
        # the recognizer is kept out of the module tree so that it is not part of the lite checkpoint
        self.__dict__["identity_net"] = None

    def attach_identity(self, net: nn.Module) -> LiteEncoder:
        """Give an ``e_identity`` encoder its frozen recognizer: ``net.embed(images, "dlib-chip") -> (B, 128)``."""
        if getattr(net, "embedding_dim", None) != self.identity_dim:
            raise CheckpointLayoutError(f"lite encoder needs a {self.identity_dim}-d identity model")
        self.__dict__["identity_net"] = net
        return self

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to(device) / .half() must reach the attached recognizer too
        super()._apply(fn, recurse)
        if self.__dict__.get("identity_net") is not None:
            self.__dict__["identity_net"]._apply(fn, recurse)
        return self

    def identity_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R) -> (B, 128) dlib descriptor scaled to unit-variance components; no gradient."""
        net = self.__dict__["identity_net"]
        if net is None:
            raise RuntimeError("lite encoder with e_identity has no identity model attached (attach_identity)")
        with torch.no_grad():
            return net.embed(images, ALIGNMENT) * math.sqrt(self.identity_dim)

    def encode_parts(
        self, images: torch.Tensor, id_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, R, R) -> (code (B, w_dim) = w_avg + base, delta (B, n_latent, w_dim) with delta[:, 0] = 0).

        ``id_features`` (B, 128): ``identity_features(images)`` when the caller already has them (training).
        """
        if images.dim() != 4 or images.shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(f"expected images (B, 3, {self.input_size}, {self.input_size}), got {tuple(images.shape)}")
        x = F.leaky_relu(self.from_rgb(images), 0.2)
        x = self.last(self.blocks(x))
        h = self.fc(x.flatten(1))
        if self.id_proj is not None:
            h = h + self.id_proj(self.identity_features(images) if id_features is None else id_features)
        h = F.leaky_relu(h, 0.2)
        code = self.w_avg + self.base(h)
        d = self.delta(h).view(-1, self.n_latent - 1, self.w_dim)
        delta = torch.cat([torch.zeros_like(d[:, :1]), d], dim=1)
        return code, delta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        code, delta = self.encode_parts(images)
        return code[:, None, :] + delta


def _strict_load(module: nn.Module, state: dict, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise CheckpointLayoutError(
            f"{what}: checkpoint layout mismatch (missing {len(missing)}: {missing[:3]}, unexpected "
            f"{len(unexpected)}: {unexpected[:3]}, wrong shape {len(bad)}: {bad[:3]})"
        )
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def _read_checkpoint(path: Path, key: str) -> dict:
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is a layout error for the bundle
        raise CheckpointLayoutError(f"cannot read lite checkpoint {Path(path).name}: {type(exc).__name__}") from exc
    if not isinstance(ckpt, dict) or key not in ckpt or not isinstance(ckpt[key], dict):
        raise CheckpointLayoutError(f"lite checkpoint {Path(path).name} has no '{key}' state dict")
    return ckpt[key]


def _freeze(m: _M) -> _M:
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def load_lite_generator(path: Path, config: dict) -> LiteGenerator:
    """Checkpoint file with a ``"generator"`` state dict -> frozen ``LiteGenerator`` in eval mode."""
    g = LiteGenerator(config)
    _strict_load(g, _read_checkpoint(path, "generator"), "lite generator")
    return _freeze(g)


def load_lite_encoder(path: Path, config: dict) -> LiteEncoder:
    """Checkpoint file with an ``"encoder"`` state dict -> frozen ``LiteEncoder`` in eval mode.

    An ``e_identity`` encoder gets the dlib recognizer of the installed face_recognition_models package (the same
    file as the bundle's ``identity`` component, whose SHA-256 the bundle loader checks).
    """
    e = LiteEncoder(config)
    _strict_load(e, _read_checkpoint(path, "encoder"), "lite encoder")
    if e.identity_dim:
        from worker.models.dlib_resnet import load_dlib_resnet

        e.attach_identity(load_dlib_resnet())
    return _freeze(e)


@torch.no_grad()
def fit_gaussian_mapping(
    generator: LiteGenerator, encoder: LiteEncoder, codes: torch.Tensor, ridge: float = 1e-4
) -> None:
    """Fit ``mapping`` to encoder codes (N, w_dim) and move the mean into ``w_avg`` of both networks.

    The encoder's output is unchanged: its base bias is shifted by minus the new mean.
    """
    codes = codes.double()
    mean = codes.mean(0)
    cov = torch.cov(codes.t())
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    chol = torch.linalg.cholesky(cov)
    shift = mean.float() - encoder.w_avg
    encoder.base.bias.sub_(shift)
    encoder.w_avg.copy_(mean.float())
    generator.w_avg.copy_(mean.float())
    generator.map_chol.copy_(chol.float())
