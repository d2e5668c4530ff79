"""A minimal reader for TensorFlow Lite model files (``.tflite`` flatbuffers): tensors, constant buffers, operators.

Written from the public TFLite schema (``schema.fbs``) and the FlatBuffers binary format, so the project reads a
``.tflite`` without TensorFlow, LiteRT or the ``flatbuffers`` package:

- a buffer starts with a ``uoffset`` (u32, little endian) to the root table;
- a table starts with an ``soffset`` (i32) back to its vtable: ``vtable = table - soffset``; the vtable holds its
  own size (u16), the table's size (u16), then one u16 offset per field (0 = absent, the schema default applies);
- a reference field (table, vector, string) holds a u32 offset relative to the field's own position; a vector is a
  u32 length followed by its elements (tables as u32 offsets relative to each element's position).

Only float32 graphs are supported (quantized tensors raise). Field numbers are the schema's field ids.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from worker.errors import CheckpointLayoutError

# BuiltinOperator codes (schema.fbs) of the ops this project executes, by name.
BUILTIN_OPS = {
    0: "ADD",
    1: "AVERAGE_POOL_2D",
    2: "CONCATENATION",
    3: "CONV_2D",
    4: "DEPTHWISE_CONV_2D",
    9: "FULLY_CONNECTED",
    11: "L2_NORMALIZATION",
    14: "LOGISTIC",
    17: "MAX_POOL_2D",
    18: "MUL",
    19: "RELU",
    21: "RELU6",
    22: "RESHAPE",
    28: "TANH",
    34: "PAD",
    40: "MEAN",
    41: "SUB",
    42: "DIV",
    43: "SQUEEZE",
    54: "PRELU",
    74: "SUM",
    75: "SQRT",
    76: "RSQRT",
    92: "SQUARE",
    99: "SQUARED_DIFFERENCE",
    101: "ABS",
    102: "MAXIMUM",
}
TENSOR_FLOAT32, TENSOR_INT32, TENSOR_INT64 = 0, 2, 4
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


class _Table:
    """A flatbuffer table at ``pos`` of ``buf``."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self._vt_len = struct.unpack_from("<H", buf, vt)[0]
        self._vt = vt

    def _field(self, i: int) -> int:
        slot = 4 + 2 * i
        if slot >= self._vt_len:
            return 0
        off = struct.unpack_from("<H", self.buf, self._vt + slot)[0]
        return self.pos + off if off else 0

    def scalar(self, i: int, fmt: str, default: int | float = 0) -> int | float:
        p = self._field(i)
        return struct.unpack_from("<" + fmt, self.buf, p)[0] if p else default

    def _ref(self, i: int) -> int:
        p = self._field(i)
        return p + struct.unpack_from("<I", self.buf, p)[0] if p else 0

    def table(self, i: int) -> _Table | None:
        p = self._ref(i)
        return _Table(self.buf, p) if p else None

    def vector(self, i: int, fmt: str) -> list:
        p = self._ref(i)
        if not p:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        return list(struct.unpack_from(f"<{n}{fmt}", self.buf, p + 4))

    def bytes_view(self, i: int) -> memoryview:
        p = self._ref(i)
        if not p:
            return memoryview(b"")
        n = struct.unpack_from("<I", self.buf, p)[0]
        return memoryview(self.buf)[p + 4 : p + 4 + n]

    def string(self, i: int) -> str:
        return bytes(self.bytes_view(i)).decode("utf-8", "replace")

    def tables(self, i: int) -> list[_Table]:
        p = self._ref(i)
        if not p:
            return []
        n = struct.unpack_from("<I", self.buf, p)[0]
        out = []
        for k in range(n):
            e = p + 4 + 4 * k
            out.append(_Table(self.buf, e + struct.unpack_from("<I", self.buf, e)[0]))
        return out


@dataclass
class TFLiteTensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None  # constant tensors only


@dataclass
class TFLiteOp:
    op: str  # builtin name (``BUILTIN_OPS``) or ``BUILTIN_<code>`` when unknown here
    inputs: list[int]
    outputs: list[int]
    options: _Table | None = field(repr=False, default=None)

    def opt(self, i: int, fmt: str, default: int | float = 0) -> int | float:
        return self.options.scalar(i, fmt, default) if self.options is not None else default

    def opt_vector(self, i: int, fmt: str) -> list:
        return self.options.vector(i, fmt) if self.options is not None else []


@dataclass
class TFLiteGraph:
    tensors: list[TFLiteTensor]
    ops: list[TFLiteOp]
    inputs: list[int]
    outputs: list[int]


def read_tflite(path: str | Path) -> TFLiteGraph:
    """Parse the first subgraph of a ``.tflite`` file (float32 constants as numpy arrays)."""
    path = Path(path)
    buf = path.read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise CheckpointLayoutError(f"{path.name}: not a TFLite flatbuffer (no TFL3 identifier)")
    model = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
    codes = []
    for oc in model.tables(1):
        deprecated = int(oc.scalar(0, "b", 0))
        code = int(oc.scalar(3, "i", 0))
        codes.append(max(deprecated, code))
    buffers = model.tables(4)
    subgraphs = model.tables(2)
    if not subgraphs:
        raise CheckpointLayoutError(f"{path.name}: no subgraph")
    sg = subgraphs[0]
    tensors = []
    for idx, t in enumerate(sg.tables(0)):
        shape = tuple(int(s) for s in t.vector(0, "i"))
        ttype = int(t.scalar(1, "b", 0))
        if ttype not in _DTYPES:
            raise CheckpointLayoutError(f"{path.name}: tensor type {ttype} not supported")
        b = int(t.scalar(2, "I", 0))
        data = None
        if 0 < b < len(buffers):
            raw = buffers[b].bytes_view(0)
            if len(raw):
                data = np.frombuffer(raw, dtype=_DTYPES[ttype]).reshape(shape).copy()
        q = t.table(4)
        if q is not None and q.vector(2, "f") and ttype != TENSOR_FLOAT32:  # scale on an integer tensor
            raise CheckpointLayoutError(f"{path.name}: quantized tensors are not supported")
        tensors.append(TFLiteTensor(idx, t.string(3), shape, _DTYPES[ttype], data))
    ops = []
    for o in sg.tables(3):
        code = codes[int(o.scalar(0, "I", 0))]
        ops.append(
            TFLiteOp(
                BUILTIN_OPS.get(code, f"BUILTIN_{code}"),
                [int(i) for i in o.vector(1, "i")],
                [int(i) for i in o.vector(2, "i")],
                o.table(4),
            )
        )
    return TFLiteGraph(tensors, ops, [int(i) for i in sg.vector(1, "i")], [int(i) for i in sg.vector(2, "i")])
