"""Run an ONNX transformer as a torch.nn.Module, train it, and write the weights back.

    module = to_torch("wide.onnx")          # float weights become nn.Parameters
    out = module(input_ids=ids, attention_mask=mask)   # {"logits": ...}, in graph-output order
    ...train module with any torch optimizer...
    proto = write_back(module, "wide.onnx") # the same graph, trained weights in its initializers

The module is an interpreter: `forward` walks the graph's nodes in order and runs each with torch
ops, so shape computations (Shape, Gather, Concat, Reshape targets, ...) run on every call and any
batch or sequence length works, as in ONNX Runtime.

Shape arithmetic is kept off the tensor path: small int tensors (shapes, axes, indices of at most 64
elements) are held as Python ints and lists ("host values"), and ops whose inputs are all host
values compute in Python. That costs no kernel launches, no device syncs, and lets torch.compile see
static sizes (or SymInts) instead of data-dependent tensors. A host value meets a tensor op only
where the graph mixes them; it is turned into a tensor there.

Which initializers train: float initializers that carry a model dimension (hidden, FFN, heads,
vocab), as found by the structure analysis - weights, biases, norms, embeddings. Float constants that
carry none (rotary inverse frequencies, scalars like sqrt(head_dim), mask fill values) stay frozen
buffers. If the structure cannot be analysed, every float initializer of rank >= 1 with more than one
element trains.

Tied weights: an initializer that feeds several nodes is one Parameter. TorchScript exports of tied
models (GPT-2, OPT, BERT-MLM) store the token embedding twice: `wte [V, H]` for the Gather and an
anonymous `[H, V]` copy for the LM head MatMul. Every initializer equal to the token embedding (as
is, or transposed) is served from the embedding's one Parameter (a transpose view when needed), so
the head and the embedding stay tied during training, and `write_back` writes both copies from it.

Numerics: float32 results match ONNX Runtime to ~1e-6 on the zoo. Under bf16/fp16 autocast, ops that
need range or precision (Softmax, LayerNormalization, reductions, Pow, Sqrt, Erf, Exp, Log,
Reciprocal, CumSum) upcast their input to float32 and return float32. Casting the module
(module.bfloat16()) casts its Parameters only: graph constants keep their type, since a float32 mask
fill value such as -3.4e38 is -inf in bf16. Dropout nodes are identities: exports are inference graphs.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from onnx_ir.tensor_adapters import TorchTensor
from torch import nn

from . import modelio
from .errors import OnnxgrowError

HOST_MAX = 64  # int/bool tensors up to this many elements (rank <= 1) are computed on the host
# What an op raises when the graph cannot run as given (shapes that do not fit, an index out of range,
# a division by zero in shape arithmetic): reported as the node that failed, like ONNX Runtime does.
# Other exceptions (TypeError, AttributeError, ...) are bugs of the bridge and stay unforeseen errors.
RUN_ERRORS = (RuntimeError, ValueError, IndexError, ZeroDivisionError, OverflowError)
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


def trunc_div(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --- ops --------------------------------------------------------------------------------------------
# Each op is fn(dev, attrs, *inputs); a host variant, host(attrs, *inputs), runs instead when every
# input is a host value, and may answer NotImplemented to fall back on the tensor op.

OPS: dict[str, tuple] = {}


def op(*names, host=None):
    def register(fn):
        for name in names:
            OPS[name] = (fn, host)
        return fn
    return register


def binary(name, torch_fn, host_fn):
    def run(dev, a, x, y):
        like = first_tensor(x, y)
        return torch_fn(T(x, dev, like), T(y, dev, like))
    op(name, host=lambda a, x, y: bmap(host_fn, x, y))(run)


def int_div(x, y):
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


binary("Add", torch.add, lambda x, y: x + y)
binary("Sub", torch.sub, lambda x, y: x - y)
binary("Mul", torch.mul, lambda x, y: x * y)
binary("Div", int_div, trunc_div)
binary("Equal", torch.eq, lambda x, y: x == y)
binary("Less", torch.lt, lambda x, y: x < y)
binary("LessOrEqual", torch.le, lambda x, y: x <= y)
binary("Greater", torch.gt, lambda x, y: x > y)
binary("GreaterOrEqual", torch.ge, lambda x, y: x >= y)
binary("And", torch.logical_and, lambda x, y: x and y)
binary("Or", torch.logical_or, lambda x, y: x or y)
binary("Xor", torch.logical_xor, lambda x, y: x != y)


@op("Pow")
def pow_(dev, a, x, y):
    x = T(x, dev)
    out = torch.pow(f32(x), T(y, dev) if isinstance(y, list) else y)
    return out if x.dtype.is_floating_point else out.to(x.dtype)  # Pow keeps the base's type


def mod_host(a, x, y):
    return bmap(math.fmod if a.get("fmod", 0) else (lambda p, q: p % q), x, y)


@op("Mod", host=mod_host)
def mod(dev, a, x, y):
    like = first_tensor(x, y)
    x, y = T(x, dev, like), T(y, dev, like)
    return torch.fmod(x, y) if a.get("fmod", 0) else torch.remainder(x, y)


def variadic(name, torch_fn, host_fn):
    def run(dev, a, *xs):
        like = first_tensor(*xs)
        out = T(xs[0], dev, like)
        for x in xs[1:]:
            out = torch_fn(out, T(x, dev, like))
        return out

    def host(a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = bmap(host_fn, out, x)
        return out
    op(name, host=host)(run)
    return run


variadic("Max", torch.maximum, max)
variadic("Min", torch.minimum, min)
sum_ = variadic("Sum", torch.add, lambda x, y: x + y)


@op("Mean")
def mean_(dev, a, *xs):
    return sum_(dev, a, *xs) / len(xs)


def unary(name, torch_fn, host_fn=None, upcast=False):
    def run(dev, a, x):
        x = T(x, dev)
        return torch_fn(f32(x) if upcast else x)
    op(name, host=(lambda a, x: bmap(host_fn, x)) if host_fn else None)(run)


unary("Neg", torch.neg, lambda x: -x)
unary("Abs", torch.abs, abs)
unary("Not", torch.logical_not, lambda x: not x)
unary("Identity", lambda x: x, lambda x: x)
unary("Sqrt", torch.sqrt, upcast=True)
unary("Reciprocal", torch.reciprocal, upcast=True)
unary("Erf", torch.erf, upcast=True)
unary("Exp", torch.exp, upcast=True)
unary("Log", torch.log, upcast=True)
unary("Tanh", torch.tanh)
unary("Sigmoid", torch.sigmoid)
unary("Relu", torch.relu)
unary("Cos", torch.cos)
unary("Sin", torch.sin)
unary("Floor", torch.floor)
unary("Ceil", torch.ceil)
unary("Round", torch.round)  # both round half to even
unary("Sign", torch.sign)
unary("IsNaN", torch.isnan)
unary("Softplus", F.softplus)


@op("IsInf")
def isinf(dev, a, x):
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    return torch.isposinf(x) if pos else torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool)


@op("LeakyRelu")
def leaky_relu(dev, a, x):
    return F.leaky_relu(x, a.get("alpha", 0.01))


@op("Elu")
def elu(dev, a, x):
    return F.elu(x, a.get("alpha", 1.0))


@op("HardSigmoid")
def hard_sigmoid(dev, a, x):
    return torch.clamp(x * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1)


@op("Gelu")
def gelu(dev, a, x):
    return F.gelu(x, approximate=a.get("approximate", "none"))


@op("Clip")
def clip(dev, a, x, lo=None, hi=None):
    lo = a.get("min") if lo is None and "min" in a else lo
    hi = a.get("max") if hi is None and "max" in a else hi
    return torch.clamp(x, T(lo, dev, x) if lo is not None else None, T(hi, dev, x) if hi is not None else None)


def cast_host(a, x):
    to = a["to"]
    if to == onnx.TensorProto.BOOL:
        return bmap(bool, x)
    if to in (onnx.TensorProto.FLOAT,):
        return bmap(float, x)
    if TORCH_DTYPE.get(to) in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return bmap(int, x)  # int() truncates toward zero, as Cast does
    return NotImplemented


@op("Cast", host=cast_host)
def cast(dev, a, x):
    if a["to"] not in TORCH_DTYPE:
        raise OnnxgrowError(f"the torch bridge cannot Cast to ONNX type {a['to']}")
    return T(x, dev).to(TORCH_DTYPE[a["to"]])


@op("CastLike")
def cast_like(dev, a, x, like):
    return T(x, dev).to(T(like, dev).dtype)


@op("Where", host=lambda a, c, x, y: bmap(lambda p, q, r: q if p else r, c, x, y))
def where(dev, a, c, x, y):
    like = first_tensor(x, y)
    return torch.where(T(c, dev).to(torch.bool), T(x, dev, like), T(y, dev, like))


@op("Dropout")
def dropout(dev, a, x, ratio=None, training=None):
    if a["_nout"] > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x


# --- matrix products and normalisation --------------------------------------------------------------


def same_dtype(dev, x, y):
    """Operands as tensors in one dtype. Autocast does this for matmuls; a module cast to bf16 as a
    whole meets the float32 outputs of the ops that upcast (Softmax, norms), and promotion keeps them
    exact. A host value (an int vector from shape arithmetic) becomes a tensor here."""
    like = first_tensor(x, y)
    x, y = T(x, dev, like), T(y, dev, like)
    if x.dtype == y.dtype:
        return x, y
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


@op("MatMul")
def matmul(dev, a, x, y):
    return torch.matmul(*same_dtype(dev, x, y))


@op("Gemm")
def gemm(dev, a, x, y, c=None):
    x, y = same_dtype(dev, x, y)
    x = x.t() if a.get("transA", 0) else x
    y = y.t() if a.get("transB", 0) else y
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if c is None:
        out = torch.mm(x, y)
        return out * alpha if alpha != 1.0 else out
    return torch.addmm(T(c, dev, x).to(x.dtype), x, y, beta=beta, alpha=alpha)


@op("Einsum")
def einsum(dev, a, *xs):
    return torch.einsum(a["equation"], *xs)


@op("Softmax", "LogSoftmax")
def softmax(dev, a, x):
    fn = torch.log_softmax if a["_op"] == "LogSoftmax" else torch.softmax
    x = f32(x)
    if a["_opset"] >= 13:
        return fn(x, a.get("axis", -1))
    # before opset 13 the input is seen as 2-D: [prod(shape[:axis]), prod(shape[axis:])]
    axis = axis_of(a.get("axis", 1), x.dim())
    return fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)


@op("LayerNormalization")
def layer_norm(dev, a, x, scale, bias=None):
    x = f32(x)
    axis = axis_of(a.get("axis", -1), x.dim())
    eps = a.get("epsilon", 1e-5)
    y = F.layer_norm(x, x.shape[axis:], scale.to(x.dtype), bias.to(x.dtype) if bias is not None else None, eps)
    if a["_nout"] == 1:
        return y
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    return (y, mean, inv_std)[:a["_nout"]]


@op("RMSNormalization")
def rms_norm(dev, a, x, scale):
    x = f32(x)
    dims = tuple(range(axis_of(a.get("axis", -1), x.dim()), x.dim()))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + a.get("epsilon", 1e-5)) * scale.to(x.dtype)


def reduce_axes(a, x, axes):
    axes = index_list(axes, "axes") if axes is not None else a.get("axes")
    if axes is None or axes == []:
        return None if not a.get("noop_with_empty_axes", 0) else []
    return [axis_of(i, x.dim()) for i in as_list(axes)]


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL2")
def reduce(dev, a, x, axes=None):
    x = T(x, dev)
    dims = reduce_axes(a, x, axes)
    if dims == []:
        return x
    dims = list(range(x.dim())) if dims is None else dims
    keep = bool(a.get("keepdims", 1))
    kind = a["_op"]
    if kind in ("ReduceMax", "ReduceMin"):
        return (torch.amax if kind == "ReduceMax" else torch.amin)(x, dims, keepdim=keep)
    if kind == "ReduceProd":
        for d in sorted(dims, reverse=True):
            x = x.prod(d, keepdim=keep)
        return x
    src = f32(x) if x.dtype.is_floating_point else x
    if kind == "ReduceMean":
        return src.mean(dims, keepdim=keep)
    if kind == "ReduceSumSquare":
        src = src * src
    out = src.sum(dims, keepdim=keep)
    if kind == "ReduceL2":
        return out.sqrt()
    return out if out.dtype.is_floating_point else out.to(x.dtype)  # torch sums ints into int64


@op("ArgMax", "ArgMin")
def argmax(dev, a, x):
    axis, keep = a.get("axis", 0), bool(a.get("keepdims", 1))
    fn = torch.argmax if a["_op"] == "ArgMax" else torch.argmin
    if a.get("select_last_index", 0):
        flipped = fn(x.flip(axis), axis, keepdim=keep)
        return x.shape[axis] - 1 - flipped
    return fn(x, axis, keepdim=keep)


@op("CumSum")
def cumsum(dev, a, x, axis):
    axis = one_int(axis, "CumSum axis")
    src = f32(x) if x.dtype.is_floating_point else x
    if a.get("reverse", 0):
        src = src.flip(axis)
    out = torch.cumsum(src, axis)
    if a.get("exclusive", 0):
        out = out - src
    if a.get("reverse", 0):
        out = out.flip(axis)
    return out if out.dtype.is_floating_point else out.to(x.dtype)


@op("Trilu")
def trilu(dev, a, x, k=None):
    k = one_int(k, "Trilu k") if k is not None else 0
    return torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)


# --- indexing ---------------------------------------------------------------------------------------


def gather_host(a, data, idx):
    if not isinstance(data, list) or a.get("axis", 0) != 0:
        return NotImplemented
    index_list(idx, "Gather indices")
    return bmap(lambda i: data[i], idx)


@op("Gather", host=gather_host)
def gather(dev, a, data, idx):
    data, idx = T(data, dev), T(idx, dev)
    axis = axis_of(a.get("axis", 0), data.dim())
    if axis == 0 and data.dim() == 2 and data.dtype.is_floating_point and idx.dim() > 0:
        # an embedding lookup: F.embedding has the cheaper backward
        return F.embedding(torch.where(idx < 0, idx + data.shape[0], idx), data)
    return data[(slice(None),) * axis + (idx,)]


@op("GatherElements")
def gather_elements(dev, a, data, idx):
    axis = axis_of(a.get("axis", 0), data.dim())
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))


@op("GatherND")
def gather_nd(dev, a, data, idx):
    data, idx = T(data, dev), T(idx, dev)
    b = a.get("batch_dims", 0)
    if b == 0:
        return data[tuple(idx[..., i] for i in range(idx.shape[-1]))]
    # batch_dims: index each batch entry separately (flatten the batch axes, add a row index)
    batch = tuple(data.shape[:b])
    n = math.prod(batch)
    data = data.reshape((n,) + tuple(data.shape[b:]))
    idx = idx.reshape((n,) + tuple(idx.shape[b:]))
    rows = torch.arange(n, device=data.device).reshape((n,) + (1,) * (idx.dim() - 2))
    out = data[(rows,) + tuple(idx[..., i] for i in range(idx.shape[-1]))]
    return out.reshape(batch + tuple(out.shape[1:]))


@op("ScatterND")
def scatter_nd(dev, a, data, idx, updates):
    data, idx, updates = T(data, dev), T(idx, dev), T(updates, dev)
    keys = tuple(idx[..., i] for i in range(idx.shape[-1]))
    reduction = a.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise OnnxgrowError(f"the torch bridge does not implement ScatterND reduction {reduction!r}")
    return data.index_put(keys, updates.to(data.dtype), accumulate=reduction == "add")


def slice_bounds(size, start, end, step):
    """ONNX Slice bounds of one axis, clamped as the spec says."""
    if step == 0:
        raise OnnxgrowError("Slice step 0")
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1)


def slice_args(starts, ends, axes, steps):
    starts, ends = index_list(starts, "Slice starts"), index_list(ends, "Slice ends")
    axes = index_list(axes, "Slice axes") if axes is not None else list(range(len(starts)))
    steps = index_list(steps, "Slice steps") if steps is not None else [1] * len(starts)
    return zip(starts, ends, axes, steps)


def slice_host(a, data, starts, ends, axes=None, steps=None):
    if not isinstance(data, list):
        return NotImplemented
    for s, e, ax, st in slice_args(starts, ends, axes, steps):
        if ax not in (0, -1):
            return NotImplemented
        s, e = slice_bounds(len(data), s, e, st)
        data = [data[i] for i in range(s, e, st)]
    return data


@op("Slice", host=slice_host)
def slice_(dev, a, data, starts, ends, axes=None, steps=None):
    data = T(data, dev)
    for s, e, ax, st in slice_args(starts, ends, axes, steps):
        ax = axis_of(ax, data.dim())
        s, e = slice_bounds(data.shape[ax], s, e, st)
        if st > 0:
            data = data[(slice(None),) * ax + (slice(s, e, st),)]
        else:
            data = data.index_select(ax, torch.arange(s, e, st, device=data.device))
    return data


# --- shapes -----------------------------------------------------------------------------------------


def host_shape(x) -> list:
    return [len(x)] if isinstance(x, list) else []


@op("Shape", host=lambda a, x: host_shape(x)[a.get("start", 0):a.get("end", None)])
def shape(dev, a, x):
    return list(x.shape)[a.get("start", 0):a.get("end", None)]


@op("Size", host=lambda a, x: math.prod(host_shape(x)))
def size(dev, a, x):
    return x.numel()


def reshape_host(a, x, target):
    flat, target = as_list(x), as_list(target)
    if len(target) == 1:
        return list(flat)
    if not target and len(flat) == 1:
        return flat[0]
    return NotImplemented


@op("Reshape", host=reshape_host)
def reshape(dev, a, x, target):
    x, target = T(x, dev), index_list(target, "Reshape shape")
    if not a.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@op("Flatten")
def flatten(dev, a, x):
    axis = axis_of(a.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(dev, a, x):
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return x.permute(perm)


def unsqueeze_host(a, x, axes=None):
    axes = as_list(axes if axes is not None else a.get("axes"))
    if not isinstance(x, list) and len(axes) == 1 and axes[0] in (0, -1):
        return [x]
    return NotImplemented


@op("Unsqueeze", host=unsqueeze_host)
def unsqueeze(dev, a, x, axes=None):
    x = T(x, dev)
    axes = index_list(axes if axes is not None else a.get("axes"), "Unsqueeze axes")
    rank = x.dim() + len(axes)
    for ax in sorted(axis_of(i, rank) for i in axes):
        x = x.unsqueeze(ax)
    return x


def squeeze_host(a, x, axes=None):
    axes = axes if axes is not None else a.get("axes")
    if isinstance(x, list) and len(x) == 1 and (axes is None or as_list(axes) in ([0], [-1])):
        return x[0]
    return NotImplemented


@op("Squeeze", host=squeeze_host)
def squeeze(dev, a, x, axes=None):
    x = T(x, dev)
    axes = index_list(axes, "Squeeze axes") if axes is not None else a.get("axes")
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(i, x.dim()) for i in as_list(axes)))


def concat_host(a, *xs):
    if not all(isinstance(x, list) for x in xs if x is not None):
        return NotImplemented
    return [v for x in xs if x is not None for v in x]


@op("Concat", host=concat_host)
def concat(dev, a, *xs):
    like = first_tensor(*xs)
    return torch.cat([T(x, dev, like) for x in xs if x is not None], a["axis"])


@op("Split")
def split(dev, a, x, sizes=None):
    axis = axis_of(a.get("axis", 0), x.dim())
    sizes = index_list(sizes, "Split sizes") if sizes is not None else a.get("split")
    if sizes is None:
        n = a.get("num_outputs") or a["_nout"]
        sizes = -(-x.shape[axis] // n)  # ceil: equal chunks, the last one smaller
    return tuple(torch.split(x, sizes, axis))


def expand_host(a, x, target):
    target = index_list(target, "Expand shape")
    if isinstance(x, list) and len(x) > 1:
        return x if len(target) == 1 and target[0] in (1, len(x)) else NotImplemented
    if len(target) > 1:
        return NotImplemented
    if not target:
        return x
    value = x[0] if isinstance(x, list) else x
    return [value] * target[0] if target[0] <= HOST_MAX else NotImplemented


@op("Expand", host=expand_host)
def expand(dev, a, x, target):
    x = T(x, dev)
    target = index_list(target, "Expand shape")
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(target)))


@op("Tile")
def tile(dev, a, x, repeats):
    return T(x, dev).repeat(index_list(repeats, "Tile repeats"))


def constant_of_shape_host(a, target):
    value, dtype = a["_fill"]
    target = index_list(target, "ConstantOfShape shape")
    if dtype.is_floating_point or len(target) > 1:
        return NotImplemented
    if not target:
        return value
    return [value] * target[0] if target[0] <= HOST_MAX else NotImplemented


@op("ConstantOfShape", host=constant_of_shape_host)
def constant_of_shape(dev, a, target):
    value, dtype = a["_fill"]
    return torch.full(index_list(target, "ConstantOfShape shape"), value, dtype=dtype, device=dev)


def scalar(x, name: str):
    """A host value that must be one number (a list of one is taken as its element)."""
    if isinstance(x, list):
        if len(x) != 1:
            raise ValueError(f"{name} must be a scalar, got {len(x)} values")
        return x[0]
    return x


@op("Range")
def range_(dev, a, start, limit, delta):
    start, limit, delta = scalar(S(start), "start"), scalar(S(limit), "limit"), scalar(S(delta), "delta")
    dtype = host_dtype([start]) if not any(isinstance(v, float) for v in (start, limit, delta)) else torch.float32
    return torch.arange(start, limit, delta, dtype=dtype, device=dev)


# --- building the module ------------------------------------------------------------------------------


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


def host_or_tensor(t: torch.Tensor):
    """Small int/bool constants of rank <= 1 live on the host; everything else stays a tensor."""
    if not t.dtype.is_floating_point and t.dim() <= 1 and t.numel() <= HOST_MAX:
        return t.tolist()
    return t


def attributes(node: ir.Node, opset: int) -> dict:
    out = {"_op": node.op_type, "_name": node.name, "_opset": opset, "_nout": len(node.outputs)}
    for name, attr in node.attributes.items():
        value = attr.value
        if isinstance(value, ir.TensorProtocol):
            value = tensor_from_ir(value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[name] = value
    if node.op_type == "ConstantOfShape":  # read at build time: .item() in forward breaks a compiled graph
        fill = out.get("value")
        out["_fill"] = (fill.reshape(-1)[0].item(), fill.dtype) if fill is not None else (0.0, torch.float32)
    return out


def load_ir(model) -> ir.Model:
    """The graph to execute; a path is loaded, a proto wrapped, an onnx-ir model used as it is."""
    if isinstance(model, (str, os.PathLike)):
        m = modelio.load(model)
    elif isinstance(model, onnx.ModelProto):
        m = ir.from_proto(model)
    elif isinstance(model, ir.Model):
        m = model
    else:
        raise OnnxgrowError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    if len(m.functions):  # exporters may wrap blocks in local functions: run their bodies inline
        from onnx.inliner import inline_local_functions
        m = ir.from_proto(inline_local_functions(ir.to_proto(m)))
    return m


def weight_plan(m: ir.Model):
    """(names of trainable initializers, {tied copy: (base name, transposed)}) from the structure."""
    from . import api
    from .structure import atoms, same_values
    floats = [v for v in m.graph.initializers.values() if v.const_value is not None
              and int(v.const_value.dtype) in FLOAT_TYPES]
    try:
        spec = api.structure(m)
    except OnnxgrowError:
        return {v.name for v in floats if len(v.shape) >= 1 and v.const_value.size > 1}, {}
    model_dims = {id(d.root()) for d in [spec.hidden, spec.vocab, *spec.ffn] + [
        d for b in spec.blocks for d in (b.attention.kv_heads, b.attention.group) if d is not None]}
    trainable = set()
    for v in floats:
        dims = spec.flow.dims.get(spec.model.graph.initializers[v.name]) or []
        if any(id(x.root()) in model_dims for d in dims for x in atoms(d)):
            trainable.add(v.name)
    base = spec.token_embedding.name
    ties = {}
    if base in m.graph.initializers:
        table = m.graph.initializers[base]
        for v in floats:
            if v is table or v.const_value.size != table.const_value.size or len(v.shape) != 2:
                continue
            if same_values(v, table):
                ties[v.name] = (base, tuple(v.shape) != tuple(table.shape))
    trainable.add(base)
    return trainable - set(ties), ties


def param_key(name: str, taken: set) -> str:
    key = re.sub(r"\W", "_", name) or "w"
    key = "w_" + key if key[0].isdigit() else key
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    taken.add(key)
    return key


class OnnxModule(nn.Module):
    """An ONNX graph run with torch ops. Build it with `to_torch`.

    forward(*inputs, **named_inputs) takes the graph inputs by position (graph-input order) or by
    name; numpy arrays are accepted, and inputs are moved to the module's device. It returns a dict
    {output name: tensor} in graph-output order (`list(out.values())` gives the tuple form).
    """

    def __init__(self, m: ir.Model, trainable: set[str], ties: dict[str, tuple[str, bool]], source=None):
        super().__init__()
        self.source = source  # what to_torch was given: write_back's default target
        graph = m.graph
        opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
        self.input_names = [v.name for v in graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in graph.outputs]
        self.onnx_types: dict[str, int] = {}  # float initializer -> ONNX type, for writing back
        self.keys: dict[str, str] = {}  # initializer -> parameter/buffer attribute
        self.tied = dict(ties)  # tied copy -> (base initializer, stored transposed)
        self._host: dict[str, object] = {}
        self._float_constants: dict[str, torch.Tensor] = {}  # buffer -> its value as the graph has it
        taken: set = set()
        for name, v in graph.initializers.items():
            if v.const_value is None:
                continue
            if int(v.const_value.dtype) in FLOAT_TYPES:
                self.onnx_types[name] = int(v.const_value.dtype)
            if name not in ties:  # a tied copy is served from its base's Parameter
                self._add_constant(name, tensor_from_ir(v.const_value), name in trainable, taken)

        unsupported, steps = set(), []
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                unsupported.add(f"{node.domain}.{node.op_type}")
                continue
            if node.op_type == "Constant":
                self._add_constant(node.outputs[0].name, constant_value(node), False, taken)
                continue
            if node.op_type not in OPS:
                unsupported.add(node.op_type)
                continue
            fn, host = OPS[node.op_type]
            steps.append((fn, host, [v.name if v is not None else None for v in node.inputs],
                          [v.name if v is not None and v.name else None for v in node.outputs],
                          attributes(node, opset)))
        if unsupported:
            raise OnnxgrowError(f"the torch bridge does not implement these ops: {', '.join(sorted(unsupported))}")
        self._steps = steps
        self._device_key = next(iter(self.keys.values()), None)
        self._drops = last_uses(steps, set(self.output_names))
        missing = [n for n in self.output_names if n not in self.keys and n not in self._host
                   and n not in self.input_names and n not in ties and not any(n in s[3] for s in steps)]
        if missing:
            raise OnnxgrowError(f"graph outputs with no producer: {', '.join(missing)}")

    def _add_constant(self, name, t, trainable, taken):
        if trainable:
            self.keys[name] = key = param_key(name, taken)
            self.register_parameter(key, nn.Parameter(t))
            return
        value = host_or_tensor(t)
        if isinstance(value, torch.Tensor):
            self.keys[name] = key = param_key(name, taken)
            self.register_buffer(key, t, persistent=False)  # a graph constant: nothing to save
            if t.dtype.is_floating_point:
                self._float_constants[key] = t
        else:
            self._host[name] = value

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .bfloat16() casts the weights, not the graph's constants: a float32 mask
        # fill value like -3.4e38 is -inf in bf16, and 0 * -inf makes NaNs. They follow the device only.
        super()._apply(fn, recurse)
        for key, original in self._float_constants.items():
            buffer = self._buffers[key]
            if buffer.dtype != original.dtype:
                self._buffers[key] = original.to(buffer.device)
        return self

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return (f"{len(self._steps)} nodes, {n:,} trainable weights in {len(list(self.parameters()))} "
                f"parameters, inputs {self.input_names}, outputs {self.output_names}")

    # --- weights by initializer name ---

    def initializer(self, name: str) -> torch.Tensor:
        """The current value of a float initializer, in the layout the graph stores it."""
        if name in self.tied:
            base, transposed = self.tied[name]
            t = getattr(self, self.keys[base])
            return t.t() if transposed else t
        if name not in self.keys:
            raise OnnxgrowError(f"the module holds no initializer {name!r}")
        return getattr(self, self.keys[name])

    def parameter(self, name: str) -> nn.Parameter | None:
        """The Parameter that holds initializer `name` (the shared one for a tied copy)."""
        name = self.tied[name][0] if name in self.tied else name
        t = getattr(self, self.keys[name]) if name in self.keys else None
        return t if isinstance(t, nn.Parameter) else None

    def float_initializers(self) -> list[str]:
        return list(self.onnx_types)

    @torch.no_grad()
    def set_initializers(self, values: dict[str, torch.Tensor]) -> None:
        """Write values (in the initializers' stored layouts) into the module's weights."""
        done = {}
        for name, value in values.items():
            if name not in self.onnx_types:
                raise OnnxgrowError(f"the module holds no float initializer {name!r}")
            target_name, transposed = self.tied.get(name, (name, False))
            value = value.t() if transposed else value
            target = getattr(self, self.keys[target_name])
            if tuple(value.shape) != tuple(target.shape):
                raise OnnxgrowError(f"{name}: shape {list(value.shape)} does not fit {list(target.shape)}")
            value = value.to(target.device, target.dtype)
            if target_name in done and not torch.equal(done[target_name], value):
                raise OnnxgrowError(f"{name} is tied to {target_name} but the values given differ")
            target.copy_(value)
            done[target_name] = value

    # --- running ---

    def device(self) -> torch.device:
        # by attribute name: torch.compile cannot trace next(iter(self.parameters()))
        return getattr(self, self._device_key).device if self._device_key else torch.device("cpu")

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        dev = self.device()
        env = dict(self._host)
        for name, key in self.keys.items():
            env[name] = getattr(self, key)
        for name, (base, transposed) in self.tied.items():
            env[name] = env[base].t() if transposed else env[base]
        env.update(self._bind(args, kwargs, dev))
        a = None
        try:
            for (fn, host, ins, outs, a), drop in zip(self._steps, self._drops):
                xs = [env[n] if n is not None else None for n in ins]
                result = NotImplemented
                if host is not None and all(not isinstance(x, torch.Tensor) for x in xs):
                    result = host(a, *xs)
                if result is NotImplemented:
                    result = fn(dev, a, *xs)
                if len(outs) == 1:
                    env[outs[0]] = result
                else:
                    for n, r in zip(outs, result):
                        if n is not None:
                            env[n] = r
                for n in drop:
                    del env[n]
        except RUN_ERRORS as e:
            raise OnnxgrowError(f"the torch bridge could not run {node_label(a)}: {one_line(e)}") from None
        return {n: T(env[n], dev) for n in self.output_names}

    def _bind(self, args, kwargs, dev) -> dict:
        if len(args) > len(self.input_names):
            raise OnnxgrowError(f"the graph takes {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise OnnxgrowError(f"the graph has no input {name!r} (inputs: {', '.join(self.input_names)})")
            if name in feeds:
                raise OnnxgrowError(f"input {name!r} given twice")
            feeds[name] = value
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxgrowError(f"missing graph inputs: {', '.join(missing)}")
        out = {}
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            out[name] = value.to(dev) if isinstance(value, torch.Tensor) and value.device != dev else value
        return out


def node_label(a: dict | None) -> str:
    if a is None:
        return "the graph"
    return f"node {a['_name']!r} ({a['_op']})" if a.get("_name") else f"a {a['_op']} node"


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:400] or type(error).__name__


def constant_value(node: ir.Node) -> torch.Tensor:
    name, attr = next(iter(node.attributes.items()))
    value = attr.value
    if name == "value":
        return tensor_from_ir(value)
    if name in ("value_int", "value_ints"):
        return torch.tensor(value, dtype=torch.int64)
    if name in ("value_float", "value_floats"):
        return torch.tensor(value, dtype=torch.float32)
    raise OnnxgrowError(f"the torch bridge does not implement Constant with {name!r}")


def last_uses(steps, keep: set) -> list[list[str]]:
    """For each step, the values no later step reads: dropped from the environment to free memory."""
    last = {}
    for i, (_, _, ins, _, _) in enumerate(steps):
        for n in ins:
            if n is not None:
                last[n] = i
    drops = [[] for _ in steps]
    for n, i in last.items():
        if n not in keep:
            drops[i].append(n)
    return drops


def to_torch(model) -> OnnxModule:
    """A torch module that computes what the ONNX model computes, with trainable weights.

    `model`: a path, an onnx.ModelProto or an onnx_ir.Model (read, never changed).
    """
    m = load_ir(model)
    trainable, ties = weight_plan(m)
    return OnnxModule(m, trainable, ties, source=model)


def as_proto(model) -> onnx.ModelProto:
    """A private ModelProto copy of a path, proto or onnx-ir model, with its weights in memory."""
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise OnnxgrowError(f"no such file: {model}")
        try:
            return onnx.load(str(model))
        except Exception:  # protobuf's parse errors say nothing useful
            raise OnnxgrowError(f"{model} is not a readable ONNX model") from None
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    raise OnnxgrowError(f"expected a model path, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def store(tp: onnx.TensorProto, value: torch.Tensor) -> None:
    """Put `value` into initializer `tp`, in tp's type. An unchanged value leaves tp as it was, so a
    round trip without training is bit-identical whatever encoding the exporter chose."""
    if tuple(value.shape) != tuple(tp.dims):
        raise OnnxgrowError(f"initializer {tp.name!r} is {list(tp.dims)}, the value is {list(value.shape)}")
    if tp.data_location == onnx.TensorProto.EXTERNAL:
        raise OnnxgrowError(f"initializer {tp.name!r} has its data outside the model; load it first")
    data = tensor_to_bytes(value, tp.data_type)
    if tp.HasField("raw_data"):
        if tp.raw_data != data:
            tp.raw_data = data
        return
    if onnx.numpy_helper.to_array(tp).tobytes() == data:
        return
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tp.ClearField(field)
    tp.raw_data = data


def write_back(module: OnnxModule, model=None) -> onnx.ModelProto:
    """`model` (default: what the module was built from) with the module's weights in its
    initializers. Tied copies are written from their one Parameter, so they stay equal."""
    model = module.source if model is None else model
    if model is None:
        raise OnnxgrowError("write_back needs the model the module was built from")
    proto = as_proto(model)
    by_name = {tp.name: tp for tp in proto.graph.initializer}
    missing = [n for n in module.float_initializers() if n not in by_name]
    if missing:
        raise OnnxgrowError(f"the model has no initializer {missing[0]!r}: the module was built from another model")
    for name in module.float_initializers():
        store(by_name[name], module.initializer(name))
    return proto


def write_into(module: OnnxModule, m: ir.Model) -> ir.Model:
    """Put the module's weights into onnx-ir model `m`, in place (train saves through this: the
    tensors stream to disk with modelio.save, with no ModelProto of the whole model in memory)."""
    for name in module.float_initializers():
        value = m.graph.initializers.get(name)
        if value is None:
            raise OnnxgrowError(f"the model has no initializer {name!r}: the module was built from another model")
        t = module.initializer(name).detach().to("cpu", TORCH_DTYPE[module.onnx_types[name]]).contiguous().clone()
        if tuple(t.shape) != tuple(value.const_value.shape):
            raise OnnxgrowError(f"initializer {name!r} is {list(value.const_value.shape)}, "
                                f"the module's {list(t.shape)}")
        value.const_value = TorchTensor(t, name=name)
    return m
