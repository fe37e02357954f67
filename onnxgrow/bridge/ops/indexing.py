"""Indexing ops: Gather (embedding lookups and shape picks), GatherElements, GatherND, ScatterND, Slice.

Gather and Slice have host variants: exports pick sizes out of a Shape with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import OnnxgrowError
from ..tensors import T, axis_of, bmap, index_list
from . import OPS


def gather_host(a, data, idx):
    if not isinstance(data, list) or a.get("axis", 0) != 0:
        return NotImplemented
    index_list(idx, "Gather indices")
    return bmap(lambda i: data[i], idx)


@OPS.register("Gather", host=gather_host)
def gather(dev, a, data, idx):
    data, idx = T(data, dev), T(idx, dev)
    axis = axis_of(a.get("axis", 0), data.dim())
    if axis == 0 and data.dim() == 2 and data.dtype.is_floating_point and idx.dim() > 0:
        # an embedding lookup: F.embedding has the cheaper backward
        return F.embedding(torch.where(idx < 0, idx + data.shape[0], idx), data)
    return data[(slice(None),) * axis + (idx,)]


@OPS.register("GatherElements")
def gather_elements(dev, a, data, idx):
    axis = axis_of(a.get("axis", 0), data.dim())
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))


@OPS.register("GatherND")
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


@OPS.register("ScatterND")
def scatter_nd(dev, a, data, idx, updates):
    data, idx, updates = T(data, dev), T(idx, dev), T(updates, dev)
    keys = tuple(idx[..., i] for i in range(idx.shape[-1]))
    reduction = a.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise OnnxgrowError(f"the torch bridge does not implement ScatterND reduction {reduction!r}")
    return data.index_put(keys, updates.to(data.dtype), accumulate=reduction == "add")


# --- Slice: starts, ends and axes are attributes until opset 10, then inputs (with steps) ---


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


def slice_list(data: list, starts, ends, axes, steps):
    for s, e, ax, st in slice_args(starts, ends, axes, steps):
        if ax not in (0, -1):
            return NotImplemented
        s, e = slice_bounds(len(data), s, e, st)
        data = [data[i] for i in range(s, e, st)]
    return data


def slice_tensor(dev, data, starts, ends, axes, steps):
    data = T(data, dev)
    for s, e, ax, st in slice_args(starts, ends, axes, steps):
        ax = axis_of(ax, data.dim())
        s, e = slice_bounds(data.shape[ax], s, e, st)
        if st > 0:
            data = data[(slice(None),) * ax + (slice(s, e, st),)]
        else:
            data = data.index_select(ax, torch.arange(s, e, st, device=data.device))
    return data


def slice_host_1(a, data):
    if not isinstance(data, list):
        return NotImplemented
    return slice_list(data, a.get("starts"), a.get("ends"), a.get("axes"), None)


@OPS.register("Slice", host=slice_host_1)
def slice_1(dev, a, data):
    return slice_tensor(dev, data, a.get("starts"), a.get("ends"), a.get("axes"), None)


def slice_host_10(a, data, starts, ends, axes=None, steps=None):
    if not isinstance(data, list):
        return NotImplemented
    return slice_list(data, starts, ends, axes, steps)


@OPS.register("Slice", since=10, host=slice_host_10)
def slice_10(dev, a, data, starts, ends, axes=None, steps=None):
    return slice_tensor(dev, data, starts, ends, axes, steps)
