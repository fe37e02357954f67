"""Matrix products, softmax, normalisation and reductions: the ops that carry a transformer's weights.

Under bf16/fp16, Softmax, the norms and the reductions upcast their input to float32 and return
float32 (they need the range); MatMul and Gemm bring mixed operands to one dtype by promotion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..tensors import T, as_list, axis_of, f32, first_tensor, index_list, one_int
from . import OPS

REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL2")


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


@OPS.register("MatMul")
def matmul(dev, a, x, y):
    return torch.matmul(*same_dtype(dev, x, y))


@OPS.register("Gemm")
def gemm(dev, a, x, y, c=None):
    x, y = same_dtype(dev, x, y)
    x = x.t() if a.get("transA", 0) else x
    y = y.t() if a.get("transB", 0) else y
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if c is None:
        out = torch.mm(x, y)
        return out * alpha if alpha != 1.0 else out
    return torch.addmm(T(c, dev, x).to(x.dtype), x, y, beta=beta, alpha=alpha)


@OPS.register("Einsum")
def einsum(dev, a, *xs):
    return torch.einsum(a["equation"], *xs)


def softmax_fn(a):
    return torch.log_softmax if a["_op"] == "LogSoftmax" else torch.softmax


@OPS.register("Softmax", "LogSoftmax")  # opsets 1-12: the input is seen as 2-D, split at `axis`
def softmax_1(dev, a, x):
    x = f32(x)
    axis = axis_of(a.get("axis", 1), x.dim())
    return softmax_fn(a)(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)


@OPS.register("Softmax", "LogSoftmax", since=13)  # along one axis, like torch
def softmax_13(dev, a, x):
    return softmax_fn(a)(f32(x), a.get("axis", -1))


@OPS.register("LayerNormalization")
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


@OPS.register("RMSNormalization")
def rms_norm(dev, a, x, scale):
    x = f32(x)
    dims = tuple(range(axis_of(a.get("axis", -1), x.dim()), x.dim()))
    return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + a.get("epsilon", 1e-5)) * scale.to(x.dtype)


# --- reductions: the axes are an attribute until opset 13 (ReduceSum) or 18 (the others) ---


def reduce_dims(a, x, axes):
    """The axes to reduce: None for all of them, [] for none (noop_with_empty_axes)."""
    if axes is None or axes == []:
        return None if not a.get("noop_with_empty_axes", 0) else []
    return [axis_of(i, x.dim()) for i in as_list(axes)]


def reduce(dev, a, x, axes):
    x = T(x, dev)
    dims = reduce_dims(a, x, axes)
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


@OPS.register("GlobalAveragePool")  # tf2onnx's LayerNorm moments: the mean over every axis after the first two
def global_average_pool(dev, a, x):
    x = f32(x)
    return x.mean(tuple(range(2, x.dim())), keepdim=True)


@OPS.register(*REDUCE_OPS)
def reduce_axes_attribute(dev, a, x):
    return reduce(dev, a, x, a.get("axes"))


def reduce_axes_input(dev, a, x, axes=None):
    return reduce(dev, a, x, index_list(axes, "axes") if axes is not None else None)


OPS.register("ReduceSum", since=13)(reduce_axes_input)
OPS.register(*(op for op in REDUCE_OPS if op != "ReduceSum"), since=18)(reduce_axes_input)


@OPS.register("ArgMax", "ArgMin")
def argmax(dev, a, x):
    axis, keep = a.get("axis", 0), bool(a.get("keepdims", 1))
    fn = torch.argmax if a["_op"] == "ArgMax" else torch.argmin
    if a.get("select_last_index", 0):
        flipped = fn(x.flip(axis), axis, keepdim=keep)
        return x.shape[axis] - 1 - flipped
    return fn(x, axis, keepdim=keep)


@OPS.register("CumSum")
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


@OPS.register("Trilu")
def trilu(dev, a, x, k=None):
    k = one_int(k, "Trilu k") if k is not None else 0
    return torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)
