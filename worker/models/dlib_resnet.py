"""dlib's 128-D face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) as a torch module.

The ``.dat`` file is read by a parser for dlib's serialization format written from dlib's documented format:

- integers: a control byte (bit 7 = negative, low 4 bits = byte count) then the magnitude, little endian;
- bool: one ASCII byte, '0' or '1'; float: mantissa (int) then exponent (int), value = mantissa * 2**exponent;
- string: length (int) then the bytes; tensor: version 2, (num_samples, k, nr, nc), raw little-endian float32;
- alias_tensor: version 1 and its 4 dims (a view into a layer's ``params``);
- a network is written top-down: loss version + loss details, then each layer's version, recursing into its
  subnetwork *before* writing its own details, so the file holds all versions top-down, then the input layer,
  then every layer's details bottom-up (= forward order). Tag and skip layers write a version (1) only.

The network (dlib's metric-learning ResNet, 29 conv layers; "affine" = frozen batch norm):

    input 150x150 RGB -> (x - channel mean) / 256
    con 7x7/2 (32), affine, relu, max_pool 3x3/2
    3 x res(32) | res_down(64), 3 x res(64) | res_down(128), 2 x res(128) | res_down(256), 2 x res(256)
    | res_down(256) | global average pool | fc 256 -> 128 (no bias)

res(N) = relu(x + aff(con3x3(relu(aff(con3x3(x)))))); res_down(N) has a stride-2 first conv and adds
avg_pool 2x2/2 of the input. dlib uses no padding for strided conv/pool layers and adds tensors of different
shapes (channels or sizes) by zero-padding the smaller one at the end (top-left aligned); both are reproduced here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.errors import CheckpointLayoutError, InvalidTensorError
from worker.models import alignment as _align

CHIP_SIZE = 150
EMBEDDING_DIM = 128


def default_model_path() -> Path:
    """``dlib_face_recognition_resnet_model_v1.dat`` of the installed ``face_recognition_models`` package."""
    import face_recognition_models

    return Path(face_recognition_models.__file__).parent / "models" / "dlib_face_recognition_resnet_model_v1.dat"


_CONV_MODE, _FC_MODE = 0, 1  # dlib layer_mode of affine_/bn_
_FC_NO_BIAS = 1  # dlib fc_bias_mode


# --- dlib serialization reader --------------------------------------------------------------------------------------
class _FormatError(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise _FormatError(f"unexpected end of file at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise _FormatError(f"bad integer control byte 0x{control:02x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if control & 0x80 else value

    def read_bool(self) -> bool:
        ch = bytes(self._take(1))
        if ch not in (b"0", b"1"):
            raise _FormatError(f"bad bool byte {ch!r} at byte {self.pos - 1}")
        return ch == b"1"

    def read_float(self) -> float:
        mantissa = self.read_int()
        exponent = self.read_int()
        return float(np.ldexp(float(mantissa), exponent))

    def read_string(self) -> str:
        n = self.read_int()
        if n < 0 or n > 1024:
            raise _FormatError(f"implausible string length {n} at byte {self.pos}")
        return bytes(self._take(n)).decode("latin-1")

    def looks_like_string(self, prefix: str) -> bool:
        pos = self.pos
        try:
            return self.read_string().startswith(prefix)
        except _FormatError:
            return False
        finally:
            self.pos = pos

    def read_tensor(self) -> np.ndarray:
        version = self.read_int()
        if version != 2:
            raise _FormatError(f"tensor version {version} at byte {self.pos}")
        dims = tuple(self.read_int() for _ in range(4))
        if any(d < 0 for d in dims):
            raise _FormatError(f"negative tensor dims {dims}")
        count = int(np.prod(dims))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def read_alias(self) -> tuple[int, int, int, int]:
        version = self.read_int()
        if version != 1:
            raise _FormatError(f"alias_tensor version {version} at byte {self.pos}")
        return tuple(self.read_int() for _ in range(4))  # type: ignore[return-value]


@dataclass
class Layer:
    """One parsed layer. kind: con, affine, relu, max_pool, avg_pool, add_prev, fc, tag (tag or skip: same bytes)."""

    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DlibNetFile:
    """A parsed dlib network file: layers in forward order (input side first)."""

    loss: str
    loss_attrs: dict[str, float]
    input_kind: str
    input_mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: list[Layer]


def _read_details(r: _Reader) -> Layer:
    name = r.read_string()
    if name.startswith("con_"):
        if name not in ("con_4", "con_5", "con_6"):
            raise _FormatError(f"unsupported conv version {name!r}")
        params = r.read_tensor()
        attrs: dict[str, Any] = {"num_filters": r.read_int(), "nr": r.read_int(), "nc": r.read_int()}
        attrs.update(stride_y=r.read_int(), stride_x=r.read_int(), padding_y=r.read_int(), padding_x=r.read_int())
        attrs["filters"] = r.read_alias()
        attrs["biases"] = r.read_alias()
        for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            attrs[key] = r.read_float()
        attrs["use_bias"] = r.read_bool() if name in ("con_5", "con_6") else True
        if name == "con_6":
            attrs["use_relu"] = r.read_bool()
        n_w = int(np.prod(attrs["filters"]))
        n_b = int(np.prod(attrs["biases"])) if attrs["use_bias"] else 0
        flat = params.reshape(-1)
        if flat.size != n_w + n_b:
            raise _FormatError(f"conv params hold {flat.size} values, filters+biases need {n_w + n_b}")
        attrs["weight"] = flat[:n_w].reshape(attrs["filters"])
        attrs["bias"] = flat[n_w:].copy() if n_b else np.zeros(attrs["num_filters"], np.float32)
        return Layer("con", attrs)
    if name in ("affine_", "affine_2"):
        params = r.read_tensor().reshape(-1)
        gamma_shape, beta_shape = r.read_alias(), r.read_alias()
        mode = r.read_int()
        disabled = r.read_bool() if name == "affine_2" else False
        n = int(np.prod(gamma_shape))
        if params.size != n + int(np.prod(beta_shape)):
            raise _FormatError("affine params do not match gamma/beta sizes")
        return Layer(
            "affine", {"gamma": params[:n].copy(), "beta": params[n:].copy(), "mode": mode, "disabled": disabled}
        )
    if name in ("bn_con2", "bn_fc2"):
        params = r.read_tensor().reshape(-1)
        r.read_alias(), r.read_alias()
        r.read_tensor(), r.read_tensor()  # batch means / invstds of the last training batch
        running_mean, running_var = r.read_tensor().reshape(-1), r.read_tensor().reshape(-1)
        r.read_int(), r.read_int()  # num_updates, running_stats_window_size
        for _ in range(4):
            r.read_float()
        eps = r.read_float()
        n = running_mean.size
        scale = params[:n] / np.sqrt(running_var + eps)
        beta = params[n:] - running_mean * scale
        mode = _CONV_MODE if name == "bn_con2" else _FC_MODE
        return Layer("affine", {"gamma": scale.astype(np.float32), "beta": beta.astype(np.float32), "mode": mode})
    if name in ("relu_", "relu_2"):
        return Layer("relu", {"disabled": r.read_bool() if name == "relu_2" else False})
    if name in ("max_pool_2", "avg_pool_2"):
        attrs = {"nr": r.read_int(), "nc": r.read_int(), "stride_y": r.read_int(), "stride_x": r.read_int()}
        attrs.update(padding_y=r.read_int(), padding_x=r.read_int())
        return Layer(name[:-2], attrs)
    if name == "add_prev_":
        return Layer("add_prev")
    if name in ("fc_2", "fc_3"):
        attrs = {"num_outputs": r.read_int(), "num_inputs": r.read_int()}
        params = r.read_tensor().reshape(-1)
        attrs["weights"], attrs["biases"] = r.read_alias(), r.read_alias()
        attrs["bias_mode"] = r.read_int()
        for key in ("lr_mult", "wd_mult", "bias_lr_mult", "bias_wd_mult"):
            attrs[key] = r.read_float()
        attrs["use_bias"] = r.read_bool() if name == "fc_3" else True
        n_w = attrs["num_inputs"] * attrs["num_outputs"]
        if params.size < n_w:
            raise _FormatError("fc params smaller than its weight matrix")
        attrs["weight"] = params[:n_w].reshape(attrs["num_inputs"], attrs["num_outputs"])
        attrs["bias"] = params[n_w : n_w + attrs["num_outputs"]].copy() if params.size > n_w else None
        return Layer("fc", attrs)
    raise _FormatError(f"unsupported layer {name!r}")


def _read_layer_tail(r: _Reader, version: int) -> None:
    """What add_layer writes after its details: 3 bools and its cached tensors (normally empty)."""
    for _ in range(3):
        r.read_bool()
    r.read_tensor(), r.read_tensor()  # x_grad, cached_output
    if version >= 2:
        r.read_tensor()  # params_grad


def parse_dlib_net(data: bytes) -> DlibNetFile:
    """Parse a dlib ``loss<...<input>>`` network file (bytes) into layers in forward order. Raises _FormatError."""
    r = _Reader(data)
    if r.read_int() != 1:
        raise _FormatError("not a dlib add_loss_layer (version != 1)")
    loss = r.read_string()
    if loss == "loss_metric_2":
        loss_attrs = {"margin": r.read_float(), "dist_thresh": r.read_float()}
    elif loss == "loss_metric_":
        loss_attrs = {"margin": 0.1, "dist_thresh": 0.75}
    else:
        raise _FormatError(f"unsupported loss {loss!r}")
    # Versions top-down until the bottom add_layer (version 3, or 2 followed directly by the input layer's name).
    markers: list[int] = []
    while True:
        version = r.read_int()
        if version == 3 or (version == 2 and r.looks_like_string("input")):
            bottom_version = version
            break
        if version not in (1, 2):
            raise _FormatError(f"unexpected layer version {version} at byte {r.pos}")
        markers.append(version)
        if len(markers) > 10_000:
            raise _FormatError("no input layer found")
    input_kind = r.read_string()
    if input_kind != "input_rgb_image_sized":
        raise _FormatError(f"unsupported input layer {input_kind!r}")
    mean = (r.read_float(), r.read_float(), r.read_float())
    size = (r.read_int(), r.read_int())
    layers = [_read_details(r)]  # the bottom add_layer's own layer
    for _ in range(3):
        r.read_bool()
    r.read_tensor(), r.read_tensor(), r.read_tensor()  # x_grad, cached_output, grad_final
    if bottom_version >= 3:
        r.read_int()  # sample expansion factor
    for version in reversed(markers):
        if version == 1:
            layers.append(Layer("tag"))
        else:
            layers.append(_read_details(r))
            _read_layer_tail(r, version)
    if r.pos != len(r.data):
        raise _FormatError(f"{len(r.data) - r.pos} trailing bytes after the network")
    return DlibNetFile(loss, loss_attrs, input_kind, mean, size, layers)


# --- the architecture ---------------------------------------------------------------------------------------------
def _expected_layers() -> list[tuple[str, dict[str, int]]]:
    """(kind, attrs to check) of dlib_face_recognition_resnet_model_v1 in forward order."""
    seq: list[tuple[str, dict[str, int]]] = [
        ("con", {"num_filters": 32, "nr": 7, "nc": 7, "stride_y": 2, "padding_y": 0}),
        ("affine", {}),
        ("relu", {}),
        ("max_pool", {"nr": 3, "nc": 3, "stride_y": 2, "padding_y": 0}),
    ]

    def block(n: int, stride: int) -> None:
        seq.append(("tag", {}))
        seq.append(
            ("con", {"num_filters": n, "nr": 3, "nc": 3, "stride_y": stride, "padding_y": 0 if stride > 1 else 1})
        )
        seq.extend([("affine", {}), ("relu", {})])
        seq.append(("con", {"num_filters": n, "nr": 3, "nc": 3, "stride_y": 1, "padding_y": 1}))
        seq.append(("affine", {}))

    for n, downs, repeats in _STAGES:
        for i in range(repeats):
            down = i == 0 and downs
            block(n, 2 if down else 1)
            if down:
                seq.extend([("tag", {}), ("tag", {}), ("avg_pool", {"nr": 2, "nc": 2, "stride_y": 2, "padding_y": 0})])
            seq.extend([("add_prev", {}), ("relu", {})])
    seq.append(("avg_pool", {"nr": 0, "nc": 0, "stride_y": 1}))
    seq.append(("fc", {"num_inputs": 256, "num_outputs": EMBEDDING_DIM, "bias_mode": _FC_NO_BIAS}))
    return seq


# (channels, first block downsamples, blocks) per stage, input side first.
_STAGES = ((32, False, 3), (64, True, 4), (128, True, 3), (256, True, 3), (256, True, 1))


def _check_layout(net: DlibNetFile, name: str) -> None:
    expected = _expected_layers()
    if net.input_size != (CHIP_SIZE, CHIP_SIZE):
        raise CheckpointLayoutError(f"{name}: input size {net.input_size}, expected 150x150")
    if len(net.layers) != len(expected):
        raise CheckpointLayoutError(f"{name}: {len(net.layers)} layers, expected {len(expected)}")
    for i, (layer, (kind, attrs)) in enumerate(zip(net.layers, expected, strict=True)):
        if layer.kind != kind:
            raise CheckpointLayoutError(f"{name}: layer {i} is {layer.kind}, expected {kind}")
        for key, value in attrs.items():
            if layer.attrs.get(key) != value:
                raise CheckpointLayoutError(
                    f"{name}: layer {i} ({kind}) has {key}={layer.attrs.get(key)}, expected {value}"
                )
        if layer.attrs.get("disabled"):
            raise CheckpointLayoutError(f"{name}: layer {i} ({kind}) is disabled")
        if kind == "affine" and layer.attrs.get("mode") != _CONV_MODE:
            raise CheckpointLayoutError(f"{name}: layer {i} affine is not in conv mode")


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib add_prev: the sum of two (B, C, H, W) tensors zero-padded to their common max shape (top-left aligned)."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class _ResBlock(nn.Module):
    """dlib ares / ares_down with each affine folded into the conv before it."""

    def __init__(self, c_in: int, c_out: int, down: bool) -> None:
        super().__init__()
        stride = 2 if down else 1
        self.down = down
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_padded(shortcut, y))


class DlibResNet(nn.Module):
    """dlib's face recognition ResNet in torch; implements worker.models.base.IdentityModel.

    ``forward`` is dlib's net exactly: RGB chips (B, 3, 150, 150) with values in [0, 255] -> raw descriptors
    (B, 128) (dlib's compute_face_descriptor, not normalised). ``embed`` is the identity-loss entry point.
    """

    embedding_dim = EMBEDDING_DIM
    mean_rgb: torch.Tensor
    input_size = CHIP_SIZE
    alignment = "dlib-chip"

    def __init__(self, mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)) -> None:
        super().__init__()
        self.register_buffer("mean_rgb", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, stride=2, padding=0)
        blocks = []
        c_in = 32
        for n, downs, repeats in _STAGES:
            for i in range(repeats):
                blocks.append(_ResBlock(c_in, n, down=bool(downs and i == 0)))
                c_in = n
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, EMBEDDING_DIM, bias=False)

    def forward(self, x150: torch.Tensor) -> torch.Tensor:
        """(B, 3, 150, 150) RGB in [0, 255] -> raw dlib descriptors (B, 128)."""
        if x150.ndim != 4 or tuple(x150.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise InvalidTensorError(f"expected (B, 3, 150, 150) chips, got {tuple(x150.shape)}")
        x = (x150 - self.mean_rgb) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    def embed(self, images: torch.Tensor, alignment: str = "dlib-chip") -> torch.Tensor:
        """images (B, 3, H, W) RGB in [-1, 1] of crop convention ``alignment`` -> L2-normalised (B, 128).

        Crops of another convention are warped to the 150 px dlib chip (differentiable); dlib chips of another
        size are resampled to 150 px (the same warp, which is then a pure scale).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidTensorError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        x = (images + 1.0) * 127.5
        x = _align.warp(x, alignment, "dlib-chip", CHIP_SIZE)
        return F.normalize(self.forward(x), dim=1)


def _build(net: DlibNetFile) -> DlibResNet:
    model = DlibResNet(mean_rgb=net.input_mean_rgb)
    convs = [layer for layer in net.layers if layer.kind == "con"]
    affines = [layer for layer in net.layers if layer.kind == "affine"]
    blocks = cast(list[_ResBlock], list(model.blocks))
    targets = [model.stem] + [conv for blk in blocks for conv in (blk.conv1, blk.conv2)]
    if not len(convs) == len(affines) == len(targets):
        raise _FormatError("conv/affine counts do not match the architecture")
    with torch.no_grad():
        for conv, aff, target in zip(convs, affines, targets, strict=True):
            w = conv.attrs["weight"]
            if tuple(w.shape) != tuple(target.weight.shape):
                raise _FormatError(f"conv weight {tuple(w.shape)}, expected {tuple(target.weight.shape)}")
            gamma, beta = aff.attrs["gamma"].astype(np.float64), aff.attrs["beta"].astype(np.float64)
            if gamma.size != w.shape[0]:
                raise _FormatError("affine size does not match its conv")
            # affine(con(x)) = gamma * (W x + b) + beta  ->  (gamma W) x + (gamma b + beta)
            target.weight.copy_(torch.from_numpy((w * gamma[:, None, None, None]).astype(np.float32)))
            assert target.bias is not None
            target.bias.copy_(torch.from_numpy((conv.attrs["bias"] * gamma + beta).astype(np.float32)))
        fc = net.layers[-1].attrs
        if fc.get("bias") is not None and np.any(fc["bias"]):
            raise _FormatError("fc layer has a bias; expected fc_no_bias")
        model.fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(fc["weight"].T)))
    model.eval()
    model.requires_grad_(False)
    return model


def load_dlib_resnet(path: Path | None = None, config: dict | None = None) -> DlibResNet:
    """Read a dlib face recognition ResNet ``.dat`` file (default: the installed package's) into a DlibResNet.

    ``config`` may hold ``device`` and ``dtype``. Raises CheckpointLayoutError (with the file name) when the file
    is not that network. The result is in eval mode with frozen parameters.
    """
    path = Path(path) if path is not None else default_model_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointLayoutError(f"{path.name}: cannot read ({exc.strerror})") from exc
    try:
        net = parse_dlib_net(data)
        _check_layout(net, path.name)
        model = _build(net)
    except _FormatError as exc:
        raise CheckpointLayoutError(f"{path.name}: {exc}") from exc
    except struct.error as exc:  # pragma: no cover - defensive
        raise CheckpointLayoutError(f"{path.name}: {exc}") from exc
    config = config or {}
    if "device" in config or "dtype" in config:
        model = model.to(device=config.get("device"), dtype=config.get("dtype"))
    return model
