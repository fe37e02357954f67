"""Values as the bridge holds them: torch tensors, and "host values" for shape arithmetic.

A host value is a Python int, float, bool or a list of them: a small int/bool tensor of rank <= 1 (a
shape, axes, indices; at most HOST_MAX elements) kept off the device, so shape arithmetic costs no
kernel launches or syncs and torch.compile sees static sizes. This module has the dtype tables, the
conversions between host values, torch tensors and ONNX tensors, and the small helpers the ops use
to read their inputs.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch

from ..errors import OnnxgrowError

HOST_MAX = 64  # int/bool tensors up to this many elements (rank <= 1) are computed on the host
LOW_PRECISION = (torch.float16, torch.bfloat16)

TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32, onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
}
# the float types that become trainable Parameters (and are written back): autograd needs these
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


# --- host values and tensors ------------------------------------------------------------------------


def host_dtype(x):
    """The torch dtype a host value stands for (its ONNX type is not kept: int64, bool or float32)."""
    first = x[0] if isinstance(x, list) and x else x
    if isinstance(first, bool):
        return torch.bool
    if isinstance(first, (float, torch.SymFloat)):
        return torch.float32
    return torch.int64


def T(x, dev, like: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor for `x` on `dev`; a host value takes the dtype of `like` (the other operand)."""
    if isinstance(x, torch.Tensor):
        return x
    dtype = like.dtype if like is not None else host_dtype(x)
    return torch.tensor(x, dtype=dtype, device=dev)


def S(x):
    """A host value (Python scalar or list) for an input that is a size, an axis or a count."""
    if x is None or not isinstance(x, torch.Tensor):
        return x
    return x.tolist()  # a device sync; the exports in the zoo never need it


def host_or_tensor(t: torch.Tensor):
    """Small int/bool constants of rank <= 1 live on the host; everything else stays a tensor."""
    if not t.dtype.is_floating_point and t.dim() <= 1 and t.numel() <= HOST_MAX:
        return t.tolist()
    return t


def as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def index_list(x, name: str) -> list:
    """An input that must hold integers (axes, a shape, sizes), as a host list; a scalar is a list of
    one. A graph that feeds it floats or a tensor of rank > 1 cannot run (a ValueError: the node fails)."""
    values = as_list(S(x))
    if any(isinstance(v, (list, float)) or v is None for v in values):
        raise ValueError(f"{name} must be a 1-D tensor of integers")
    return values


def one_int(x, name: str):
    values = index_list(x, name)
    if len(values) != 1:
        raise ValueError(f"{name} must be one integer, got {len(values)}")
    return values[0]


def scalar(x, name: str):
    """A host value that must be one number (a list of one is taken as its element)."""
    if isinstance(x, list):
        if len(x) != 1:
            raise ValueError(f"{name} must be a scalar, got {len(x)} values")
        return x[0]
    return x


def f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in LOW_PRECISION else x


def first_tensor(*xs):
    return next((x for x in xs if isinstance(x, torch.Tensor)), None)


def bmap(f, *xs):
    """Elementwise `f` over host scalars and lists, with ONNX broadcasting of length-1 lists."""
    if not any(isinstance(x, list) for x in xs):
        return f(*xs)
    n = max(len(x) for x in xs if isinstance(x, list))
    cols = [x * n if isinstance(x, list) and len(x) == 1 else x if isinstance(x, list) else [x] * n for x in xs]
    return [f(*row) for row in zip(*cols)]


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- ONNX tensors ----------------------------------------------------------------------------------


def from_numpy(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, bfloat16 included (numpy holds it as ml_dtypes.bfloat16, which torch rejects)."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def tensor_from_ir(tensor) -> torch.Tensor:
    """A torch copy of an onnx-ir tensor, any dtype (bf16 and fp8 too), from its raw bytes."""
    dtype = TORCH_DTYPE.get(int(tensor.dtype))
    if dtype is None:
        raise OnnxgrowError(f"the torch bridge cannot hold tensors of ONNX type {tensor.dtype}")
    shape = tuple(int(d) for d in tensor.shape)
    raw = tensor.tobytes()
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def tensor_to_bytes(t: torch.Tensor, onnx_type: int) -> bytes:
    """Raw little-endian bytes of `t` in the initializer's ONNX type (what raw_data holds)."""
    t = t.detach().to("cpu", TORCH_DTYPE[onnx_type]).contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
