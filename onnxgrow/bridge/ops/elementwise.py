"""Elementwise ops: arithmetic, comparisons and logic, unary math, activations, casts, Where, Clip.

Arithmetic and comparisons have host variants (Python on ints and lists, with ONNX broadcasting of
length-1 lists), so the shape arithmetic of an export never becomes tensors. Ops that need range or
precision (Pow, Sqrt, Reciprocal, Erf, Exp, Log) upcast bf16/fp16 inputs to float32.
"""

from __future__ import annotations

import math

import onnx
import torch
import torch.nn.functional as F

from ...errors import OnnxgrowError
from ..tensors import TORCH_DTYPE, T, bmap, f32, first_tensor
from . import OPS


def binary(name, torch_fn, host_fn):
    def run(dev, a, x, y):
        like = first_tensor(x, y)
        return torch_fn(T(x, dev, like), T(y, dev, like))
    OPS.register(name, host=lambda a, x, y: bmap(host_fn, x, y))(run)


def int_div(x, y):
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def trunc_div(a, b):
    """ONNX Div on host integers: truncates toward zero (Python's // floors)."""
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


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


@OPS.register("Pow")
def pow_(dev, a, x, y):
    x = T(x, dev)
    out = torch.pow(f32(x), T(y, dev) if isinstance(y, list) else y)
    return out if x.dtype.is_floating_point else out.to(x.dtype)  # Pow keeps the base's type


def mod_host(a, x, y):
    return bmap(math.fmod if a.get("fmod", 0) else (lambda p, q: p % q), x, y)


@OPS.register("Mod", host=mod_host)
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
    OPS.register(name, host=host)(run)
    return run


variadic("Max", torch.maximum, max)
variadic("Min", torch.minimum, min)
sum_ = variadic("Sum", torch.add, lambda x, y: x + y)


@OPS.register("Mean")
def mean_(dev, a, *xs):
    return sum_(dev, a, *xs) / len(xs)


def unary(name, torch_fn, host_fn=None, upcast=False):
    def run(dev, a, x):
        x = T(x, dev)
        return torch_fn(f32(x) if upcast else x)
    OPS.register(name, host=(lambda a, x: bmap(host_fn, x)) if host_fn else None)(run)


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


@OPS.register("IsInf")
def isinf(dev, a, x):
    pos, neg = a.get("detect_positive", 1), a.get("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    return torch.isposinf(x) if pos else torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool)


@OPS.register("LeakyRelu")
def leaky_relu(dev, a, x):
    return F.leaky_relu(x, a.get("alpha", 0.01))


@OPS.register("Elu")
def elu(dev, a, x):
    return F.elu(x, a.get("alpha", 1.0))


@OPS.register("HardSigmoid")
def hard_sigmoid(dev, a, x):
    return torch.clamp(x * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1)


@OPS.register("Gelu", since=20)  # a standard op from opset 20 (ONNX Runtime's contrib Gelu is not run)
def gelu(dev, a, x):
    return F.gelu(x, approximate=a.get("approximate", "none"))


def clamp(dev, x, lo, hi):
    return torch.clamp(x, T(lo, dev, x) if lo is not None else None, T(hi, dev, x) if hi is not None else None)


@OPS.register("Clip")  # opsets 1-10: the bounds are attributes
def clip_1(dev, a, x):
    return clamp(dev, x, a.get("min"), a.get("max"))


@OPS.register("Clip", since=11)  # the bounds became optional inputs
def clip_11(dev, a, x, lo=None, hi=None):
    return clamp(dev, x, lo, hi)


def cast_host(a, x):
    to = a["to"]
    if to == onnx.TensorProto.BOOL:
        return bmap(bool, x)
    if to in (onnx.TensorProto.FLOAT,):
        return bmap(float, x)
    if TORCH_DTYPE.get(to) in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return bmap(int, x)  # int() truncates toward zero, as Cast does
    return NotImplemented


@OPS.register("Cast", host=cast_host)
def cast(dev, a, x):
    if a["to"] not in TORCH_DTYPE:
        raise OnnxgrowError(f"the torch bridge cannot Cast to ONNX type {a['to']}")
    return T(x, dev).to(TORCH_DTYPE[a["to"]])


@OPS.register("CastLike")
def cast_like(dev, a, x, like):
    return T(x, dev).to(T(like, dev).dtype)


@OPS.register("Where", host=lambda a, c, x, y: bmap(lambda p, q, r: q if p else r, c, x, y))
def where(dev, a, c, x, y):
    like = first_tensor(x, y)
    return torch.where(T(c, dev).to(torch.bool), T(x, dev, like), T(y, dev, like))


@OPS.register("Dropout")  # exports are inference graphs: an identity (ratio and training are ignored)
def dropout(dev, a, x, ratio=None, training=None):
    if a["_nout"] > 1:
        return x, torch.ones_like(x, dtype=torch.bool)
    return x
