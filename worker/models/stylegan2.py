"""StyleGAN2 generator (config F, skip architecture) in plain torch, loading the public PyTorch checkpoint layouts.

Two layouts load into the same network (``StyleGAN2Generator``) with ``load_state_dict(strict=True)`` after key
mapping:

- rosinality/stylegan2-pytorch (also the ``decoder.*`` inside e4e/pSp checkpoints): ``{"g_ema": state,
  "latent_avg": (w_dim,)}``. Modulation biases include the +1, upsampling conv kernels are stored flipped
  relative to TensorFlow.
- genforce (FaceAnonyMixer, FALCO): ``{"generator_smooth": state, "generator": state, ...}``; the EMA weights
  ``generator_smooth`` are used when present. Modulation biases exclude the +1 (added at run time) and
  upsampling kernels keep the TensorFlow orientation; both are converted on load.

Resampling is a pure-torch upfirdn (zero insertion, padding, FIR), no custom CUDA ops. Noise is fixed: one
buffer per conv layer from the checkpoint, or explicit tensors passed to ``synthesis``.

Latent layout: W+ has ``n_latent = 2 * log2(resolution) - 2`` rows (18 at 1024 px). Conv ``j`` (0 = the 4 px conv)
uses row ``j``; the ToRGB after resolution block ``k`` (0 = 4 px) uses row ``2k + 1``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError
from worker.models.bundle import check_constant, freeze, load_strict, read_checkpoint, strip_prefix, sub_dict

SQRT2 = math.sqrt(2.0)
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)


# --- resampling ---------------------------------------------------------------------------------------------------
def fir_kernel(taps: Sequence[float] = BLUR_TAPS, gain: float = 1.0) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D kernel (k, k) with sum ``gain``."""
    t = torch.tensor(taps, dtype=torch.float32)
    k = t[:, None] * t[None, :]
    return k / k.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
    """Upsample by zero insertion, pad, FIR-filter (true convolution), decimate. Same on both axes.

    x (B, C, H, W); kernel (k, k); pad (before, after) >= 0. Output side: ``(H * up + sum(pad) - k) // down + 1``.
    """
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    if pad[0] or pad[1]:
        x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    kh, kw = kernel.shape
    weight = kernel.flip(0, 1).to(x.dtype).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    x = F.conv2d(x, weight, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


# --- layers -------------------------------------------------------------------------------------------------------
class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: y = x @ (W * lr_mul / sqrt(in)).T + b * lr_mul."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, bias_init: float = 0.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) -> (B, out_dim); leaky ReLU(0.2) * sqrt(2) when ``activate``."""
        y = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(y, 0.2) * SQRT2 if self.activate else y


class MappingNetwork(nn.Module):
    """z (B, z_dim) -> pixel norm -> ``n_layers`` equalised linear + lrelu layers -> w (B, w_dim)."""

    def __init__(self, z_dim: int, w_dim: int, n_layers: int, lr_mul: float = 0.01):
        super().__init__()
        self.layers = nn.ModuleList(
            EqualLinear(z_dim if i == 0 else w_dim, w_dim, lr_mul=lr_mul, activate=True) for i in range(n_layers)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = layer(x)
        return x


class ModulatedConv2d(nn.Module):
    """Style-modulated conv: weight (out, in, k, k) scaled per sample by ``affine(w)`` (B, in), then demodulated.

    ``upsample``: transposed conv with stride 2 followed by a [1,3,3,1] blur (output 2x the input side).
    """

    blur: torch.Tensor

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, w_dim: int, demodulate: bool = True, upsample: bool = False
    ):
        super().__init__()
        self.in_ch, self.out_ch, self.k = in_ch, out_ch, kernel_size
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(in_ch * kernel_size * kernel_size)
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            p = (len(BLUR_TAPS) - 2) - (kernel_size - 1)
            self.blur_pad = ((p + 1) // 2 + 1, p // 2 + 1)
            self.register_buffer("blur", fir_kernel(gain=4.0), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W), w (B, w_dim) -> (B, out, H', W') with H' = 2H when upsampling, else H."""
        b, _, h, wd = x.shape
        style = self.affine(w)  # (B, in)
        weight = self.weight[None] * (self.scale * style[:, None, :, None, None])  # (B, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4)) + 1e-8)[:, :, None, None, None]
        x = x.reshape(1, b * self.in_ch, h, wd)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * self.in_ch, self.out_ch, self.k, self.k)
            y = F.conv_transpose2d(x, weight, stride=2, groups=b)
            y = y.reshape(b, self.out_ch, y.shape[-2], y.shape[-1])
            return upfirdn2d(y, self.blur, pad=self.blur_pad)
        weight = weight.reshape(b * self.out_ch, self.in_ch, self.k, self.k)
        y = F.conv2d(x, weight, padding=self.k // 2, groups=b)
        return y.reshape(b, self.out_ch, h, wd)


class StyledConv(nn.Module):
    """Modulated 3x3 conv + fixed noise * strength + bias + lrelu(0.2) * sqrt(2)."""

    noise: torch.Tensor

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, resolution: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, upsample=upsample)
        self.register_buffer("noise", torch.randn(1, 1, resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in, H, W), w (B, w_dim), noise (B|1, 1, res, res) or None for the fixed buffer."""
        y = self.conv(x, w)
        y = y + self.noise_strength * (self.noise if noise is None else noise)
        return F.leaky_relu(y + self.bias[None, :, None, None], 0.2) * SQRT2


class ToRGB(nn.Module):
    """Modulated 1x1 conv (no demodulation) to 3 channels + bias, plus the upsampled skip image."""

    up_kernel: torch.Tensor

    def __init__(self, in_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(3))
        self.register_buffer("up_kernel", fir_kernel(gain=4.0), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in, H, W), w (B, w_dim), skip (B, 3, H/2, W/2) or None -> (B, 3, H, W)."""
        y = self.conv(x, w) + self.bias[None, :, None, None]
        if skip is not None:
            y = y + upfirdn2d(skip, self.up_kernel, up=2, pad=(2, 1))
        return y


def default_channels(resolution: int, channel_base: int = 32768, channel_max: int = 512) -> dict[int, int]:
    """Config-F feature maps per resolution: min(channel_max, channel_base // res) (512 ... 32 at 1024 px)."""
    return {4 * 2**i: min(channel_max, channel_base // (4 * 2**i)) for i in range(int(math.log2(resolution)) - 1)}


class SynthesisNetwork(nn.Module):
    """W+ (B, n_latent, w_dim) -> image (B, 3, R, R), skip architecture, fixed noise."""

    def __init__(self, resolution: int, w_dim: int, channels: dict[int, int]):
        super().__init__()
        log_res = int(math.log2(resolution))
        if 2**log_res != resolution or resolution < 8:
            raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
        self.resolution = resolution
        self.w_dim = w_dim
        self.n_latent = 2 * log_res - 2
        self.const = nn.Parameter(torch.randn(1, channels[4], 4, 4))
        convs = [StyledConv(channels[4], channels[4], w_dim, 4)]
        rgbs = [ToRGB(channels[4], w_dim)]
        for i in range(3, log_res + 1):
            res = 2**i
            convs.append(StyledConv(channels[res // 2], channels[res], w_dim, res, upsample=True))
            convs.append(StyledConv(channels[res], channels[res], w_dim, res))
            rgbs.append(ToRGB(channels[res], w_dim))
        self.convs = nn.ModuleList(convs)
        self.to_rgbs = nn.ModuleList(rgbs)

    def forward(self, wplus: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """wplus (B, n_latent, w_dim); noise: one tensor (or None = fixed buffer) per conv layer, or None."""
        if wplus.ndim != 3 or wplus.shape[1] != self.n_latent or wplus.shape[2] != self.w_dim:
            raise ValueError(f"W+ must be (B, {self.n_latent}, {self.w_dim}), got {tuple(wplus.shape)}")
        if noise is None:
            noise = [None] * len(self.convs)
        elif len(noise) != len(self.convs):
            raise ValueError(f"noise needs {len(self.convs)} entries, got {len(noise)}")
        x = self.const.expand(wplus.shape[0], -1, -1, -1)
        x = self.convs[0](x, wplus[:, 0], noise[0])
        img = self.to_rgbs[0](x, wplus[:, 1])
        for k in range(1, len(self.to_rgbs)):
            x = self.convs[2 * k - 1](x, wplus[:, 2 * k - 1], noise[2 * k - 1])
            x = self.convs[2 * k](x, wplus[:, 2 * k], noise[2 * k])
            img = self.to_rgbs[k](x, wplus[:, 2 * k + 1], img)
        return img


class StyleGAN2Generator(nn.Module):
    """StyleGAN2 generator implementing ``worker.models.base.Generator``.

    ``mapping(z)`` z (B, z_dim) -> w (B, w_dim); ``truncate(w, psi)`` moves w toward ``w_avg``;
    ``synthesis(wplus, noise=None)`` W+ (B, n_latent, w_dim) -> image (B, 3, R, R), roughly in [-1, 1]
    (not clamped: callers decide).
    """

    w_avg: torch.Tensor

    def __init__(
        self,
        resolution: int = 1024,
        z_dim: int = 512,
        w_dim: int = 512,
        n_mapping: int = 8,
        channels: dict[int, int] | None = None,
        mapping_lr_mul: float = 0.01,
        alignment: str = "ffhq",
    ):
        super().__init__()
        self.resolution = resolution
        self.z_dim = z_dim
        self.w_dim = w_dim
        self.alignment = alignment
        self.mapping_net = MappingNetwork(z_dim, w_dim, n_mapping, mapping_lr_mul)
        self.synthesis_net = SynthesisNetwork(resolution, w_dim, channels or default_channels(resolution))
        self.n_latent = self.synthesis_net.n_latent
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim) -> w (B, w_dim)."""
        return self.mapping_net(z)

    def truncate(self, w: torch.Tensor, psi: float, w_avg: torch.Tensor | None = None) -> torch.Tensor:
        """w (B, w_dim) or (B, L, w_dim) -> w_avg + psi * (w - w_avg) (psi = 1 is the identity)."""
        centre = self.w_avg if w_avg is None else w_avg
        return centre + psi * (w - centre)

    def synthesis(self, wplus: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """W+ (B, n_latent, w_dim) -> image (B, 3, resolution, resolution); fixed noise unless given."""
        return self.synthesis_net(wplus, noise)

    def forward(self, wplus: torch.Tensor) -> torch.Tensor:
        return self.synthesis(wplus)

    @torch.no_grad()
    def estimate_w_avg(self, n: int = 10000, seed: int = 0, batch: int = 2000) -> torch.Tensor:
        """Mean of mapping(z) over ``n`` z ~ N(0, I) drawn by a seeded CPU generator; stored in ``w_avg``."""
        g = torch.Generator().manual_seed(seed)
        total = torch.zeros(self.w_dim, dtype=torch.float64)
        dev = self.w_avg.device
        for start in range(0, n, batch):
            z = torch.randn(min(batch, n - start), self.z_dim, generator=g)
            total += self.mapping(z.to(dev)).double().sum(0).cpu()
        self.w_avg.copy_((total / n).float())
        return self.w_avg

    def num_noise_layers(self) -> int:
        return len(self.synthesis_net.convs)


# --- checkpoint layouts --------------------------------------------------------------------------------------------
_UP_KERNEL = fir_kernel(gain=4.0)  # every constant resampling kernel in both layouts is [1,3,3,1] normalised x 4


def _rename(
    state: dict[str, Any], rules: list[tuple[str, Callable[[re.Match], str]]], constants: dict[str, Any]
) -> dict[str, Any]:
    """Apply the first matching (regex, new-name) rule to each key; keys matching ``constants`` rules are moved
    out to ``constants``. Keys matching nothing are kept unchanged (they surface as unexpected keys)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        for pattern, repl in rules:
            m = re.fullmatch(pattern, key)
            if m:
                new = repl(m)
                if new.startswith("const:"):
                    constants[key] = value
                else:
                    out[new] = value
                break
        else:
            out[key] = value
    return out


def _mod_rules(src: str, dst: str) -> list[tuple[str, Callable[[re.Match], str]]]:
    """rosinality StyledConv ``src`` (regex prefix) -> our StyledConv ``dst`` (format string with {i})."""
    return [
        (src + r"\.conv\.weight", lambda m: dst.format(**_idx(m)) + ".conv.weight"),
        (src + r"\.conv\.modulation\.(?P<p>weight|bias)", lambda m: dst.format(**_idx(m)) + f".conv.affine.{m['p']}"),
        (src + r"\.noise\.weight", lambda m: dst.format(**_idx(m)) + ".noise_strength"),
        (src + r"\.activate\.bias", lambda m: dst.format(**_idx(m)) + ".bias"),
        (src + r"\.conv\.blur\.kernel", lambda m: "const:"),
    ]


def _idx(m: re.Match) -> dict[str, int]:
    return {"i": int(m["i"]) + 1} if "i" in m.groupdict() and m["i"] is not None else {}


def rosinality_to_ours(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """rosinality ``g_ema`` keys -> ``StyleGAN2Generator`` keys; returns (mapped state, constant buffers)."""
    p = r"(?P<p>weight|bias)"
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"style\.(?P<n>\d+)\.(?P<p>weight|bias)", lambda m: f"mapping_net.layers.{int(m['n']) - 1}.{m['p']}"),
        (r"input\.input", lambda m: "synthesis_net.const"),
        (r"noises\.noise_(?P<n>\d+)", lambda m: f"synthesis_net.convs.{m['n']}.noise"),
        (r"to_rgb1\.conv\.weight", lambda m: "synthesis_net.to_rgbs.0.conv.weight"),
        (r"to_rgb1\.conv\.modulation\." + p, lambda m: f"synthesis_net.to_rgbs.0.conv.affine.{m['p']}"),
        (r"to_rgb1\.bias", lambda m: "synthesis_net.to_rgbs.0.bias"),
        (r"to_rgbs\.(?P<n>\d+)\.conv\.weight", lambda m: f"synthesis_net.to_rgbs.{int(m['n']) + 1}.conv.weight"),
        (
            r"to_rgbs\.(?P<n>\d+)\.conv\.modulation\." + p,
            lambda m: f"synthesis_net.to_rgbs.{int(m['n']) + 1}.conv.affine.{m['p']}",
        ),
        (r"to_rgbs\.(?P<n>\d+)\.bias", lambda m: f"synthesis_net.to_rgbs.{int(m['n']) + 1}.bias"),
        (r"to_rgbs\.(?P<n>\d+)\.upsample\.kernel", lambda m: "const:"),
    ]
    rules += _mod_rules("conv1", "synthesis_net.convs.0")
    rules += _mod_rules(r"convs\.(?P<i>\d+)", "synthesis_net.convs.{i}")
    constants: dict[str, Any] = {}
    out = _rename(state, rules, constants)
    for key, value in list(out.items()):
        # rosinality stores modulated weights as (1, out, in, k, k) and the ToRGB bias as (1, 3, 1, 1).
        if key.endswith(".conv.weight") and torch.is_tensor(value) and value.ndim == 5 and value.shape[0] == 1:
            out[key] = value[0]
        elif key.startswith("synthesis_net.to_rgbs.") and key.endswith(".bias") and torch.is_tensor(value):
            out[key] = value.reshape(-1)
    return out, constants


def genforce_to_ours(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """genforce ``StyleGAN2Generator`` keys -> ours; flips upsampling kernels and adds the +1 modulation bias."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"mapping\.dense(?P<n>\d+)\.(?P<p>weight|bias)", lambda m: f"mapping_net.layers.{m['n']}.{m['p']}"),
        (r"truncation\.w_avg", lambda m: "w_avg"),
        (r"synthesis\.early_layer\.const", lambda m: "synthesis_net.const"),
        (r"synthesis\.layer(?P<n>\d+)\.weight", lambda m: f"synthesis_net.convs.{m['n']}.conv.weight"),
        (
            r"synthesis\.layer(?P<n>\d+)\.style\.(?P<p>weight|bias)",
            lambda m: f"synthesis_net.convs.{m['n']}.conv.affine.{m['p']}",
        ),
        (r"synthesis\.layer(?P<n>\d+)\.noise_strength", lambda m: f"synthesis_net.convs.{m['n']}.noise_strength"),
        (r"synthesis\.layer(?P<n>\d+)\.noise", lambda m: f"synthesis_net.convs.{m['n']}.noise"),
        (r"synthesis\.layer(?P<n>\d+)\.bias", lambda m: f"synthesis_net.convs.{m['n']}.bias"),
        (r"synthesis\.layer(?P<n>\d+)\.filter\.kernel", lambda m: "const:"),
        (r"synthesis\.output(?P<n>\d+)\.weight", lambda m: f"synthesis_net.to_rgbs.{m['n']}.conv.weight"),
        (r"synthesis\.output(?P<n>\d+)\.bias", lambda m: f"synthesis_net.to_rgbs.{m['n']}.bias"),
        (
            r"synthesis\.output(?P<n>\d+)\.style\.(?P<p>weight|bias)",
            lambda m: f"synthesis_net.to_rgbs.{m['n']}.conv.affine.{m['p']}",
        ),
        (r"synthesis\.upsample\.kernel", lambda m: "const:"),
    ]
    constants: dict[str, Any] = {}
    out = _rename(state, rules, constants)
    for key, value in list(out.items()):
        if not torch.is_tensor(value):
            continue
        m = re.fullmatch(r"synthesis_net\.convs\.(\d+)\.conv\.weight", key)
        if m and int(m[1]) % 2 == 1 and value.ndim == 4:
            out[key] = value.flip(2, 3)  # TF-orientation transposed-conv kernel -> ours
        elif key.endswith(".conv.affine.bias"):
            out[key] = value + 1.0  # genforce adds the +1 at run time
        elif key.endswith(".noise_strength"):
            out[key] = value.reshape(-1)
    return out, constants


def _shape(state: dict[str, Any], key: str, path: Path) -> tuple[int, ...]:
    if key not in state or not torch.is_tensor(state[key]):
        raise CheckpointLayoutError(f"{Path(path).name} is not a StyleGAN2 checkpoint: missing {key}")
    return tuple(state[key].shape)


def _build(state: dict[str, Any], path: Path, config: dict[str, Any]) -> StyleGAN2Generator:
    """Infer resolution, widths and depths from the mapped keys' shapes, then build the matching network."""
    n_rgb = len([k for k in state if re.fullmatch(r"synthesis_net\.to_rgbs\.\d+\.conv\.weight", k)])
    n_map = len([k for k in state if re.fullmatch(r"mapping_net\.layers\.\d+\.weight", k)])
    if n_rgb < 2 or n_map < 1:
        raise CheckpointLayoutError(
            f"{Path(path).name} is not a StyleGAN2 checkpoint: {n_rgb} ToRGB and {n_map} mapping layers found"
        )
    resolution = 2 ** (n_rgb + 1)
    want = config.get("resolution")
    if want is not None and int(want) != resolution:
        raise CheckpointLayoutError(f"{Path(path).name}: checkpoint is {resolution} px, config says {want}")
    z_dim = _shape(state, "mapping_net.layers.0.weight", path)[1]
    w_dim = _shape(state, "synthesis_net.convs.0.conv.affine.weight", path)[1]
    channels = {4: _shape(state, "synthesis_net.const", path)[1]}
    for k in range(1, n_rgb):
        channels[4 * 2**k] = _shape(state, f"synthesis_net.convs.{2 * k}.conv.weight", path)[0]
    return StyleGAN2Generator(resolution, z_dim, w_dim, n_map, channels, alignment=config.get("alignment", "ffhq"))


def _check_constants(constants: dict[str, Any], expected_keys: list[str], path: Path) -> None:
    for key in expected_keys:
        check_constant(constants, key, _UP_KERNEL, path)
    if constants:
        raise CheckpointLayoutError(f"{Path(path).name}: unexpected buffers {sorted(constants)[:4]}")


def _w_avg_from(value: Any, w_dim: int, path: Path) -> torch.Tensor:
    """latent_avg (w_dim,), (1, w_dim) or (n_latent, w_dim) with equal rows (e4e/pSp repeat it) -> (w_dim,)."""
    if not torch.is_tensor(value) or value.shape[-1] != w_dim:
        raise CheckpointLayoutError(f"{Path(path).name}: latent_avg is not a (.., {w_dim}) tensor")
    rows = value.reshape(-1, w_dim).float()
    if not torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-5):
        raise CheckpointLayoutError(f"{Path(path).name}: latent_avg rows differ; expected one repeated w")
    return rows[0]


def load_rosinality(path: Path, config: dict[str, Any]) -> StyleGAN2Generator:
    """rosinality checkpoint -> frozen ``StyleGAN2Generator``.

    config: ``state_key`` (default ``"g_ema"``; use ``"state_dict"`` with ``prefix: "decoder."`` for the generator
    inside ``e4e_ffhq_encode.pt``), ``latent_avg_key`` (default ``"latent_avg"``; when absent w_avg is estimated
    from ``w_avg_samples`` (10000) mapped z with seed ``w_avg_seed`` (0)), ``resolution`` (asserted),
    ``alignment`` (default ``"ffhq"``), ``allow_pickle``.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, config)
    state = sub_dict(ckpt, config.get("state_key", "g_ema"), path)
    prefix = config.get("prefix", "")
    if prefix:
        state = strip_prefix(state, prefix)
        if not state:
            raise CheckpointLayoutError(f"{path.name}: no keys under prefix {prefix!r}")
    mapped, constants = rosinality_to_ours(state)
    gen = _build(mapped, path, config)
    n_up = len(gen.synthesis_net.to_rgbs) - 1
    _check_constants(
        constants,
        [f"convs.{2 * k}.conv.blur.kernel" for k in range(n_up)]
        + [f"to_rgbs.{k}.upsample.kernel" for k in range(n_up)],
        path,
    )
    latent_avg = ckpt.get(config.get("latent_avg_key", "latent_avg")) if isinstance(ckpt, dict) else None
    mapped["w_avg"] = gen.w_avg.clone() if latent_avg is None else _w_avg_from(latent_avg, gen.w_dim, path)
    load_strict(gen, mapped, path, "rosinality StyleGAN2")
    if latent_avg is None:
        gen.estimate_w_avg(int(config.get("w_avg_samples", 10000)), int(config.get("w_avg_seed", 0)))
    freeze(gen)
    return gen


def load_genforce(path: Path, config: dict[str, Any]) -> StyleGAN2Generator:
    """genforce checkpoint -> frozen ``StyleGAN2Generator``.

    config: ``state_key`` (default ``"generator_smooth"`` if present, else ``"generator"``), ``resolution``,
    ``alignment``, ``allow_pickle``. Conditional (label) generators are not supported.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, config)
    key = config.get("state_key") or (
        "generator_smooth" if isinstance(ckpt, dict) and "generator_smooth" in ckpt else "generator"
    )
    mapped, constants = genforce_to_ours(sub_dict(ckpt, key, path))
    gen = _build(mapped, path, config)
    n_up = len(gen.synthesis_net.to_rgbs) - 1
    _check_constants(
        constants,
        [f"synthesis.layer{2 * k + 1}.filter.kernel" for k in range(n_up)] + ["synthesis.upsample.kernel"],
        path,
    )
    load_strict(gen, mapped, path, "genforce StyleGAN2")
    freeze(gen)
    return gen
