"""Read the initializers (weights) of an ONNX file without the ``onnx`` package.

The runtime needs the raw bytes of the tensors it shares between sessions (see
``Router(share_weights=True)``). An ONNX file is a protobuf ``ModelProto``; this module walks its
wire format just far enough to find ``graph.initializer`` entries stored as ``raw_data``::

    ModelProto  field 7  graph        (message GraphProto)
    GraphProto  field 5  initializer  (repeated TensorProto)
    TensorProto field 1  dims         (int64, packed or not)
                field 2  data_type    (int32: 1 float32, 10 float16, 3 int8, 2 uint8, 6 int32, 7 int64, 11 double)
                field 8  name         (string)
                field 9  raw_data     (bytes)

Tensors with external data or typed fields (``float_data`` ...) are skipped: they are not shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
DTYPE_NAMES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}


class OnnxFormatError(ValueError):
    """The file is not a protobuf ONNX model this reader understands."""


@dataclass(frozen=True)
class Initializer:
    name: str
    data_type: int
    dims: tuple[int, ...]
    raw: memoryview  # a view into the file's bytes

    def array(self) -> np.ndarray:
        """A private copy of the tensor (the file's bytes can then be freed)."""
        return np.frombuffer(self.raw, dtype=DTYPES[self.data_type]).reshape(self.dims).copy()


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise OnnxFormatError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise OnnxFormatError("varint too long")


def _fields(data: memoryview):
    """(field number, wire type, value) of a message: ints for varints, memoryviews for bytes."""
    pos = 0
    value: int | memoryview
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise OnnxFormatError(f"field {number}: {size} bytes past the end")
            value, pos = data[pos : pos + size], pos + size
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise OnnxFormatError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _tensor(message: memoryview) -> Initializer | None:
    dims, data_type, name, raw = [], 0, "", None
    for number, wire, value in _fields(message):
        if number == 1:
            if wire == 2:  # packed
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif number == 2:
            data_type = value
        elif number == 8:
            name = bytes(value).decode("utf-8")
        elif number == 9:
            raw = value
    if raw is None or data_type not in DTYPES:
        return None
    expected = (
        int(np.prod(dims, dtype=np.int64)) * np.dtype(DTYPES[data_type]).itemsize
        if dims
        else np.dtype(DTYPES[data_type]).itemsize
    )
    if len(raw) != expected:
        raise OnnxFormatError(f"initializer {name!r}: {len(raw)} raw bytes for shape {dims} of type {data_type}")
    return Initializer(name, data_type, tuple(dims), raw)


def read_initializers(path: str | Path, names: set[str] | None = None) -> dict[str, Initializer]:
    """The raw-data initializers of ``path`` (only ``names`` if given), keyed by name."""
    data = memoryview(Path(path).read_bytes())
    graphs = [value for number, wire, value in _fields(data) if number == 7 and wire == 2]
    if len(graphs) != 1:
        raise OnnxFormatError(f"{path}: expected one graph in the model, found {len(graphs)}")
    out = {}
    for number, wire, value in _fields(graphs[0]):
        if number == 5 and wire == 2:
            tensor = _tensor(value)
            if tensor is not None and (names is None or tensor.name in names):
                out[tensor.name] = tensor
    return out
