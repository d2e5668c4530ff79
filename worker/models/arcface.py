"""ArcFace IR-SE-50 (``model_ir_se50.pth``, the recognizer e4e/pSp use for their identity loss).

Layout (TreB1eN/InsightFace_Pytorch ``Backbone(112, 50, mode="ir_se")``): ``input_layer.*``, ``body.*`` (see
``worker.models.irse``), ``output_layer.{0 BatchNorm2d(512), 1 Dropout, 2 Flatten, 3 Linear(512*7*7, 512),
4 BatchNorm1d(512)}``. The final BatchNorm1d may be affine or not (``IR_SE_50`` helpers build it without affine).

Input convention (as the e4e/pSp ID loss and FaceAnonyMixer apply it): an FFHQ-aligned face resized to 256 px,
crop rows 35:223 and columns 32:220, adaptive average pool to 112, then the network; output L2-normalised (B, 512).
Faces in another crop convention are first warped into the FFHQ convention with
``worker.models.alignment.warp``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError
from worker.models.bundle import freeze, load_strict, read_checkpoint, strip_prefix
from worker.models.irse import WIDTHS_50, infer_widths, make_body, make_input_layer

FRAME = 256  # the FFHQ frame the crop is defined in
CROP_ROWS = (35, 223)
CROP_COLS = (32, 220)


class ArcFaceIRSE50(nn.Module):
    """Implements ``worker.models.base.IdentityModel``; ``forward`` takes network-ready (B, 3, 112, 112) crops."""

    def __init__(
        self,
        widths: tuple[int, ...] = WIDTHS_50,
        embedding_dim: int = 512,
        input_size: int = 112,
        affine_out: bool = True,
        drop_ratio: float = 0.6,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        side = input_size // 16
        self.input_layer = make_input_layer(widths[0])
        self.body = make_body(widths)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, embedding_dim),
            nn.BatchNorm1d(embedding_dim, affine=affine_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, input_size, input_size) in [-1, 1] -> L2-normalised (B, embedding_dim)."""
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)

    def crop(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        """Generator-convention images (B, 3, H, W) -> the network's (B, 3, 112, 112) input, differentiably."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if alignment != "ffhq":
            from worker.models.alignment import warp

            x = warp(images, alignment, "ffhq", FRAME)
        elif images.shape[-2:] != (FRAME, FRAME):
            x = F.interpolate(images, size=(FRAME, FRAME), mode="bilinear", align_corners=False, antialias=True)
        else:
            x = images
        x = x[:, :, CROP_ROWS[0] : CROP_ROWS[1], CROP_COLS[0] : CROP_COLS[1]]
        return F.adaptive_avg_pool2d(x, (self.input_size, self.input_size))

    def embed(self, images: torch.Tensor, alignment: str) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] of convention ``alignment`` -> L2-normalised (B, embedding_dim)."""
        return self(self.crop(images, alignment))


def load_arcface(path: Path, config: dict[str, Any]) -> ArcFaceIRSE50:
    """``model_ir_se50.pth`` (a bare state dict; a ``module.`` DataParallel prefix is tolerated) -> frozen model.

    config: ``allow_pickle``.
    """
    path = Path(path)
    state = read_checkpoint(path, config)
    if not isinstance(state, dict):
        raise CheckpointLayoutError(f"{path.name} is not an ArcFace state dict ({type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")
    widths = infer_widths(state, "", path)
    lin = state.get("output_layer.3.weight")
    if not torch.is_tensor(lin) or lin.ndim != 2:
        raise CheckpointLayoutError(f"{path.name} is not an ArcFace IR-SE checkpoint: missing output_layer.3.weight")
    side = round((lin.shape[1] / widths[-1]) ** 0.5)
    if side < 1 or widths[-1] * side * side != lin.shape[1]:
        raise CheckpointLayoutError(
            f"{path.name}: output_layer.3.weight {tuple(lin.shape)} does not fit a {widths[-1]}-channel feature map"
        )
    input_size = 16 * side
    model = ArcFaceIRSE50(widths, int(lin.shape[0]), input_size, affine_out="output_layer.4.weight" in state)
    load_strict(model, state, path, "ArcFace IR-SE-50")
    freeze(model)
    return model
