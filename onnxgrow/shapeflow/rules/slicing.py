"""Ops that cut an axis into segments, join segments, or index into an axis.

Split and Slice cut a Dim into a concatenation of segments (q | k | v of a fused projection); their
literal sizes and bounds get a meaning from the segments they measure: a Split size is the size of
its segment, a Slice bound is an offset, the sum of the segments before it. Concat joins segments.
On a shape vector (the output of Shape), Slice, Gather and Concat pick and join its elements.
"""

from __future__ import annotations

import numpy as np

from ...dims import Dim, cut, refine, segments, unify
from ...registry import MICROSOFT
from ..core import INT64_MAX, RULES, Meaning, attr, optional_input


@RULES.register("Concat")
def concat(flow, node, ins):
    if any(s is None for s in ins):
        return flow.fail(node, "input shape unknown")
    axis = attr(node, "axis") % len(ins[0])
    parts = [s[axis] for s in ins if s[axis].size != 0]
    out = list(ins[0])
    for s in ins[1:]:
        for k in range(len(out)):
            if k != axis:
                unify(out[k], s[k])
    cat = Dim(None)
    cat.kind, cat.parts = "cat", parts
    out[axis] = parts[0] if len(parts) == 1 else cat
    flow.out(node, out)
    es = [flow.elems(v) for v in node.inputs]
    if len(ins[0]) == 1 and all(e is not None for e in es):
        flow.vals[node.outputs[0]] = [e for lst in es for e in lst]


@RULES.register("Split")
def split_1(flow, node, ins):
    split(flow, node, ins[0], attr(node, "split"), None)


@RULES.register("Split", since=13)
def split_13(flow, node, ins):
    sizes_input = optional_input(node, 1)
    if sizes_input is None:
        return split(flow, node, ins[0], None, None)
    sizes = flow.ints(sizes_input)
    if ins[0] is not None and sizes is None:
        return flow.fail(node, "split sizes are not constant")
    split(flow, node, ins[0], sizes, flow.elems(sizes_input))


def split(flow, node, x, sizes, literals):
    """Cut the axis into segments of `sizes` (equal parts, one per output, if None)."""
    if x is None:
        return flow.fail(node, "input shape unknown")
    axis = attr(node, "axis", 0) % len(x)
    if sizes is None:
        n = len(node.outputs)
        if x[axis].size is None or x[axis].size % n:
            return flow.fail(node, "uneven split of an unknown size")
        sizes = [x[axis].size // n] * n
    parts = refine(x[axis], "cat", list(sizes))
    for i, p in enumerate(parts):
        flow.out(node, x[:axis] + [p] + x[axis + 1:], i)
        if literals:
            flow.mean(literals[i], Meaning("size", [p]), node)


@RULES.register("Slice")
def slice_1(flow, node, ins):
    bounds = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    slice_axes(flow, node, ins[0], bounds, None, None)


@RULES.register("Slice", since=10)
def slice_10(flow, node, ins):
    starts, ends = node.inputs[1], node.inputs[2]
    axes, steps = optional_input(node, 3), optional_input(node, 4)
    bounds = flow.ints(starts), flow.ints(ends), flow.ints(axes), flow.ints(steps)
    slice_axes(flow, node, ins[0], bounds, flow.elems(starts), flow.elems(ends))


def slice_axes(flow, node, x, bounds, start_elems, end_elems):
    """Slice `x` by (starts, ends, axes, steps); the Elems of starts and ends get their meanings."""
    if x is None:
        return flow.fail(node, "input shape unknown")
    starts, ends, axes, steps = bounds
    if axes is None:
        axes = list(range(len(starts))) if starts is not None else None
    if node.inputs[0] in flow.vals and starts is not None and ends is not None and len(x) == 1:
        # slicing a shape vector picks elements
        picked = flow.vals[node.inputs[0]][slice(starts[0], ends[0], steps[0] if steps else None)]
        flow.vals[node.outputs[0]] = picked
        return flow.out(node, [Dim(len(picked))])
    if starts is None or ends is None or axes is None:
        # bounds computed at run time from shapes: they follow the model by themselves
        out = list(x)
        for a in axes or []:
            out[a % len(x)] = Dim(None)
        if axes is None:
            out = [Dim(None) for _ in x]
        return flow.out(node, out)
    if steps and any(s != 1 for s in steps):
        return flow.fail(node, "strided slice")
    out = list(x)
    for i, a in enumerate(axes):
        a %= len(x)
        if x[a].size is None:
            out[a] = Dim(None)  # dynamic axis (sequence): bounds are positions, not model sizes
            continue
        literals = (start_elems[i] if start_elems else None, end_elems[i] if end_elems else None)
        out[a] = slice_segments(flow, node, x[a], starts[i], ends[i], literals)
    flow.out(node, out)


def slice_segments(flow, node, d: Dim, start: int, end: int, literals) -> Dim:
    """Cut `d` at the slice bounds; the slice is the segments between them."""
    size = d.size
    s = max(0, min(size, start + size if start < 0 else start))
    e = max(0, min(size, end + size if end < 0 else end))
    if s == 0 and e == size:
        return d
    cut(d, s)
    cut(d, e)
    segs = segments(d)
    offsets = np.cumsum([0] + [g.size for g in segs]).tolist()
    inside = segs[offsets.index(s):offsets.index(e)]
    if len(inside) == 1:
        result = inside[0]
    else:
        result = Dim(None)
        result.kind, result.parts = "cat", inside
    for lit, bound in zip(literals, (s, e)):
        if lit is None or not lit.literal or lit.value >= INT64_MAX // 2:
            continue  # "to the end" stays "to the end"
        flow.mean(lit, Meaning("offset", segs[:offsets.index(bound)]), node)
    return result


@RULES.register("Gather")
def gather(flow, node, ins):
    data, idx = ins
    if data is None or idx is None:
        return flow.fail(node, "input shape unknown")
    axis = attr(node, "axis", 0) % len(data)
    flow.out(node, data[:axis] + idx + data[axis + 1:])
    de, ie = flow.elems(node.inputs[0]), flow.ints(node.inputs[1])
    if de is not None and ie is not None:
        flow.vals[node.outputs[0]] = [de[i] for i in ie]
    elif data[axis].size not in (None, 1) and node.inputs[1].is_initializer():
        # a constant index into a model dimension (e.g. picking one of q/k/v) must stay valid
        flow.problems_if_resized(node, data[axis], "constant index into this axis")


@RULES.register("GatherElements")
def gather_elements(flow, node, ins):
    flow.out(node, ins[1])


@RULES.register("GatherND")
@RULES.register("GatherND", domain=MICROSOFT)
def gather_nd(flow, node, ins):
    data, idx = ins
    if data is None or idx is None or idx[-1].size is None:
        return flow.fail(node, "input shape unknown")
    b = attr(node, "batch_dims", 0)
    flow.out(node, idx[:-1] + data[b + idx[-1].size:])


@RULES.register("ScatterND")
def scatter_nd(flow, node, ins):
    flow.out(node, ins[0])
