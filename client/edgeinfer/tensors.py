"""numpy arrays <-> ``edgeinfer.v1.Tensor``: the one place that knows the wire format.

Both the client and the daemon use these functions, so the encoding rules
(little-endian, C order, exact byte length, overflow-checked element counts)
live once.
"""

from __future__ import annotations

import math

import numpy as np

from edgeinfer.v1 import tensor_pb2

DataType = tensor_pb2.DataType

#: Wire dtype -> numpy dtype (always little-endian).
NUMPY_DTYPES: dict[int, np.dtype[np.generic]] = {
    tensor_pb2.BOOL: np.dtype("?"),
    tensor_pb2.UINT8: np.dtype("u1"),
    tensor_pb2.INT8: np.dtype("i1"),
    tensor_pb2.INT16: np.dtype("<i2"),
    tensor_pb2.INT32: np.dtype("<i4"),
    tensor_pb2.INT64: np.dtype("<i8"),
    tensor_pb2.UINT16: np.dtype("<u2"),
    tensor_pb2.UINT32: np.dtype("<u4"),
    tensor_pb2.UINT64: np.dtype("<u8"),
    tensor_pb2.FLOAT16: np.dtype("<f2"),
    tensor_pb2.FLOAT32: np.dtype("<f4"),
    tensor_pb2.FLOAT64: np.dtype("<f8"),
}

#: Names used in config files, the CLI and error messages.
DTYPE_NAMES: dict[int, str] = {
    tensor_pb2.BOOL: "bool",
    tensor_pb2.UINT8: "uint8",
    tensor_pb2.INT8: "int8",
    tensor_pb2.INT16: "int16",
    tensor_pb2.INT32: "int32",
    tensor_pb2.INT64: "int64",
    tensor_pb2.UINT16: "uint16",
    tensor_pb2.UINT32: "uint32",
    tensor_pb2.UINT64: "uint64",
    tensor_pb2.FLOAT16: "float16",
    tensor_pb2.FLOAT32: "float32",
    tensor_pb2.FLOAT64: "float64",
}
DTYPES_BY_NAME: dict[str, int] = {name: code for code, name in DTYPE_NAMES.items()}
_CODES_BY_KIND: dict[tuple[str, int], int] = {
    (dtype.kind, dtype.itemsize): code for code, dtype in NUMPY_DTYPES.items()
}

#: Tensors may have at most this many dimensions (as numpy).
MAX_DIMS = 32


class TensorError(ValueError):
    """A tensor on the wire is malformed; the message says what and how."""


def dtype_name(code: int) -> str:
    """The config-file name of a wire dtype, or a description of a bad one."""
    return DTYPE_NAMES.get(code, f"unknown dtype {code}")


def dtype_code(dtype: np.dtype[np.generic]) -> int:
    """The wire dtype of a numpy dtype; TensorError for ones the protocol lacks."""
    code = _CODES_BY_KIND.get((dtype.kind, dtype.itemsize))
    if code is None:
        supported = ", ".join(DTYPE_NAMES.values())
        raise TensorError(f"numpy dtype {dtype} has no wire type; supported: {supported}")
    return code


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    """Multiply out a shape exactly, refusing negative dims and too many dims.

    Python integers do not wrap around the way ``np.prod`` on int64 does, so a
    shape declaring 10**12 elements gives 10**12, and the byte-length check
    that follows refuses it before anything is allocated.
    """
    if len(shape) > MAX_DIMS:
        raise TensorError(f"shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    if shape and min(shape) < 0:
        raise TensorError(f"shape {shape_repr(shape)} has a negative dimension")
    return math.prod(shape)


def to_proto(
    name: str, array: np.ndarray, tensor: tensor_pb2.Tensor | None = None
) -> tensor_pb2.Tensor:
    """Encode an array as a Tensor, copying its bytes once."""
    array = np.asarray(array)
    code = dtype_code(array.dtype)
    wire_dtype = NUMPY_DTYPES[code]
    if array.dtype != wire_dtype or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire_dtype)
    if tensor is None:
        tensor = tensor_pb2.Tensor()
    tensor.name = name
    tensor.dtype = code  # type: ignore[assignment]  # the enum is an int at run time
    tensor.shape.extend(array.shape)
    tensor.data = array.tobytes()
    return tensor


def from_bytes(
    dtype: int, shape: list[int] | tuple[int, ...], data: bytes | memoryview
) -> np.ndarray:
    """Decode raw bytes into a read-only array, with no copy.

    Raises TensorError naming what came and what was expected.
    """
    np_dtype = NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        raise TensorError(
            f"has dtype {dtype_name(dtype)}; expected one of {', '.join(DTYPES_BY_NAME)}"
        )
    count = element_count(shape)
    if count * np_dtype.itemsize != len(data):
        raise TensorError(
            f"has {len(data)} bytes of data; shape {shape_repr(shape)} of {dtype_name(dtype)}"
            f" needs {count * np_dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=np_dtype, count=count).reshape(shape)


def from_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor's inline bytes into a read-only array, with no copy."""
    try:
        return from_bytes(tensor.dtype, tuple(tensor.shape), tensor.data)
    except TensorError as error:
        raise TensorError(f"tensor {tensor.name!r} {error}") from None


def shape_repr(shape: list[int] | tuple[int, ...]) -> str:
    """A shape as written in messages: [-1, 64]."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


__all__ = [
    "DTYPES_BY_NAME",
    "DTYPE_NAMES",
    "NUMPY_DTYPES",
    "TensorError",
    "dtype_code",
    "dtype_name",
    "element_count",
    "from_bytes",
    "from_proto",
    "shape_repr",
    "to_proto",
]
