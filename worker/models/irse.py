"""IR-SE-50 backbone (improved residual units with squeeze-excitation), shared by e4e and ArcFace.

Module names follow the public checkpoints (TreB1eN/InsightFace_Pytorch ``model_ir_se50.pth``, the ``encoder.*``
part of e4e/pSp checkpoints): ``input_layer.{0 conv, 1 bn, 2 prelu}``, ``body.{i}.shortcut_layer.{0 conv, 1 bn}``
(absent when a unit keeps its width: then it is a parameter-free strided identity), ``body.{i}.res_layer.{0 bn,
1 conv3x3, 2 prelu, 3 conv3x3 (stride), 4 bn, 5 se.fc1/fc2}``.

The 50-layer plan is 3, 4, 14, 3 units per stage; the first unit of each stage halves the resolution. Stage widths
are parameters (64, 128, 256, 512 in the public weights) so that layout tests can use narrow random checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.errors import CheckpointLayoutError

UNITS_50 = (3, 4, 14, 3)
WIDTHS_50 = (64, 128, 256, 512)
SE_REDUCTION = 16


class SEModule(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(relu(fc1(avgpool(x))))) with 1x1 convs, no biases."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class StridedIdentity(nn.Module):
    """Shortcut of a unit that keeps its width: every ``stride``-th pixel (a 1x1 max-pool), no parameters."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x


class BottleneckIRSE(nn.Module):
    """Improved residual unit: BN-conv-PReLU-conv(stride)-BN-SE, plus a (projected) shortcut."""

    def __init__(self, in_ch: int, depth: int, stride: int):
        super().__init__()
        if in_ch == depth:
            self.shortcut_layer: nn.Module = StridedIdentity(stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_ch, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def unit_plan(widths: Sequence[int] = WIDTHS_50, units: Sequence[int] = UNITS_50) -> list[tuple[int, int, int]]:
    """(in_channels, depth, stride) per unit: each stage starts with a stride-2 unit from the previous width."""
    plan = []
    prev = widths[0]
    for width, n in zip(widths, units, strict=True):
        plan.append((prev, width, 2))
        plan += [(width, width, 1)] * (n - 1)
        prev = width
    return plan


def make_input_layer(width: int = 64) -> nn.Sequential:
    """3x3 conv (no bias) -> BN -> PReLU at full resolution: (B, 3, H, W) -> (B, width, H, W)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))


def make_body(widths: Sequence[int] = WIDTHS_50, units: Sequence[int] = UNITS_50) -> nn.Sequential:
    """The 24 IR-SE units: (B, widths[0], H, W) -> (B, widths[-1], H / 16, W / 16)."""
    return nn.Sequential(*[BottleneckIRSE(i, d, s) for i, d, s in unit_plan(widths, units)])


def stage_starts(units: Sequence[int] = UNITS_50) -> list[int]:
    """Body index of each stage's first unit (0, 3, 7, 21 for IR-50)."""
    starts, total = [], 0
    for n in units:
        starts.append(total)
        total += n
    return starts


def infer_widths(state: dict[str, Any], prefix: str, path: Path, units: Sequence[int] = UNITS_50) -> tuple[int, ...]:
    """Stage widths of an IR-SE checkpoint from its conv shapes (input width first is checked to equal stage 1)."""
    widths = []
    for start in stage_starts(units):
        key = f"{prefix}body.{start}.res_layer.1.weight"
        if key not in state or not torch.is_tensor(state[key]) or state[key].ndim != 4:
            raise CheckpointLayoutError(f"{Path(path).name} is not an IR-SE-50 checkpoint: missing {key}")
        widths.append(int(state[key].shape[0]))
    stem = state.get(f"{prefix}input_layer.0.weight")
    if not torch.is_tensor(stem) or stem.shape[0] != widths[0]:
        raise CheckpointLayoutError(f"{Path(path).name}: missing or inconsistent {prefix}input_layer.0.weight")
    return tuple(widths)
