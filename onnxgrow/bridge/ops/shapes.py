"""Shape ops: Shape and Size, Reshape, Flatten, Transpose, (Un)Squeeze, Concat, Split, Expand, Tile,
ConstantOfShape, Range.

Shape returns a host list, and the ops downstream of it have host variants, so the size arithmetic
of an export runs in Python (or on SymInts under torch.compile) and reaches a tensor op as a list.
"""

from __future__ import annotations

import math

import torch

from ..tensors import HOST_MAX, S, T, as_list, axis_of, first_tensor, host_dtype, index_list, scalar
from . import OPS


def host_shape(x) -> list:
    return [len(x)] if isinstance(x, list) else []


@OPS.register("Shape", host=lambda a, x: host_shape(x)[a.get("start", 0):a.get("end", None)])
def shape(dev, a, x):
    return list(x.shape)[a.get("start", 0):a.get("end", None)]


@OPS.register("Size", host=lambda a, x: math.prod(host_shape(x)))
def size(dev, a, x):
    return x.numel()


def reshape_host(a, x, target):
    flat, target = as_list(x), as_list(target)
    if len(target) == 1:
        return list(flat)
    if not target and len(flat) == 1:
        return flat[0]
    return NotImplemented


@OPS.register("Reshape", host=reshape_host)
def reshape(dev, a, x, target):
    x, target = T(x, dev), index_list(target, "Reshape shape")
    if not a.get("allowzero", 0):
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@OPS.register("Flatten")
def flatten(dev, a, x):
    axis = axis_of(a.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@OPS.register("Transpose")
def transpose(dev, a, x):
    perm = a.get("perm") or list(reversed(range(x.dim())))
    return x.permute(perm)


# --- Unsqueeze, Squeeze and Split: axes (sizes) are attributes until opset 13, then inputs ---


def unsqueeze_host(x, axes):
    axes = as_list(axes)
    if not isinstance(x, list) and len(axes) == 1 and axes[0] in (0, -1):
        return [x]
    return NotImplemented


def unsqueeze(dev, x, axes):
    x = T(x, dev)
    axes = index_list(axes, "Unsqueeze axes")
    rank = x.dim() + len(axes)
    for ax in sorted(axis_of(i, rank) for i in axes):
        x = x.unsqueeze(ax)
    return x


@OPS.register("Unsqueeze", host=lambda a, x: unsqueeze_host(x, a.get("axes")))
def unsqueeze_1(dev, a, x):
    return unsqueeze(dev, x, a.get("axes"))


@OPS.register("Unsqueeze", since=13, host=lambda a, x, axes=None: unsqueeze_host(x, axes))
def unsqueeze_13(dev, a, x, axes=None):
    return unsqueeze(dev, x, axes)


def squeeze_host(x, axes):
    if isinstance(x, list) and len(x) == 1 and (axes is None or as_list(axes) in ([0], [-1])):
        return x[0]
    return NotImplemented


def squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axis_of(i, x.dim()) for i in as_list(axes)))


@OPS.register("Squeeze", host=lambda a, x: squeeze_host(x, a.get("axes")))
def squeeze_1(dev, a, x):
    return squeeze(T(x, dev), a.get("axes"))


@OPS.register("Squeeze", since=13, host=lambda a, x, axes=None: squeeze_host(x, axes))
def squeeze_13(dev, a, x, axes=None):
    return squeeze(T(x, dev), index_list(axes, "Squeeze axes") if axes is not None else None)


def split(a, x, sizes):
    axis = axis_of(a.get("axis", 0), x.dim())
    if sizes is None:
        n = a.get("num_outputs") or a["_nout"]  # num_outputs: from opset 18
        sizes = -(-x.shape[axis] // n)  # ceil: equal chunks, the last one smaller
    return tuple(torch.split(x, sizes, axis))


@OPS.register("Split")  # opsets 1-12: the sizes are the `split` attribute (opset 1 also took an input)
def split_1(dev, a, x, sizes=None):
    return split(a, x, index_list(sizes, "Split sizes") if sizes is not None else a.get("split"))


@OPS.register("Split", since=13)  # the sizes became an optional input
def split_13(dev, a, x, sizes=None):
    return split(a, x, index_list(sizes, "Split sizes") if sizes is not None else None)


def concat_host(a, *xs):
    if not all(isinstance(x, list) for x in xs if x is not None):
        return NotImplemented
    return [v for x in xs if x is not None for v in x]


@OPS.register("Concat", host=concat_host)
def concat(dev, a, *xs):
    like = first_tensor(*xs)
    return torch.cat([T(x, dev, like) for x in xs if x is not None], a["axis"])


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


@OPS.register("Expand", host=expand_host)
def expand(dev, a, x, target):
    x = T(x, dev)
    target = index_list(target, "Expand shape")
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(target)))


@OPS.register("Tile")
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


@OPS.register("ConstantOfShape", host=constant_of_shape_host)
def constant_of_shape(dev, a, target):
    value, dtype = a["_fill"]
    return torch.full(index_list(target, "ConstantOfShape shape"), value, dtype=dtype, device=dev)


@OPS.register("Range")
def range_(dev, a, start, limit, delta):
    start, limit, delta = scalar(S(start), "start"), scalar(S(limit), "limit"), scalar(S(delta), "delta")
    dtype = host_dtype([start]) if not any(isinstance(v, float) for v in (start, limit, delta)) else torch.float32
    return torch.arange(start, limit, delta, dtype=dtype, device=dev)
