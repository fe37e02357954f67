"""Ops that read, compute or change shapes: Shape, Reshape, Expand, Squeeze, Transpose...

Reshape is where most model dimensions are found. Its target is matched against the row-major
factors of the input, left to right up to a -1 and right to left after it; a literal that covers
part of a factor splits that factor:

    [b, s, 64] -> Reshape [0, 0, 4, 16]:   64 becomes the product (4 x 16), the literal 4 means the
                                           first factor and 16 the second
    [b, s, 4, 16] -> Reshape [0, 0, -1]:   the -1 is the product of what is left, (4 x 16) again

A target element read from a Shape at run time carries its Dim, which is placed as a whole.
"""

from __future__ import annotations

from ...dims import Dim, DimConflict, factors, product_of, take, unify
from ...registry import MICROSOFT
from ..core import RULES, SMALL_INT_TENSOR, Elem, Meaning, attr, optional_input


@RULES.register("Constant")
def constant(flow, node, ins):
    raise DimConflict("Constant nodes must be lifted to initializers first")


@RULES.register("Shape")
def shape(flow, node, ins):
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    start, end = attr(node, "start", 0), attr(node, "end", None)
    picked = x[slice(start, end)]
    flow.out(node, [Dim(len(picked))])
    flow.vals[node.outputs[0]] = [Elem(dim=d, value=d.size) for d in picked]


@RULES.register("Size")
def size(flow, node, ins):
    flow.out(node, [])


@RULES.register("Reshape")
def reshape(flow, node, ins):
    x = ins[0]
    target = flow.elems(node.inputs[1])
    if x is None or target is None:
        return flow.fail(node, "target shape not computable")
    if node.inputs[0] in flow.vals and len(target) == 1:
        flow.pass_values(node)  # a shape vector stays a vector
    allowzero = attr(node, "allowzero", 0)
    flat = [f for d in x for f in factors(d)]
    target = [Elem(dim=x[i]) if (e.literal and e.value == 0 and not allowzero) else e
              for i, e in enumerate(target)]
    holes = [i for i, e in enumerate(target) if e.literal and e.value == -1]
    split = holes[0] if holes else len(target)
    out: list[Dim | None] = [None] * len(target)
    pos = 0
    for i in range(split):
        out[i], pos = consume(flow, flat, pos, target[i], node)
    rev = list(reversed(flat[pos:]))
    rpos = 0
    for i in reversed(range(split + 1, len(target))):
        out[i], rpos = consume(flow, rev, rpos, target[i], node, reverse=True)
    if holes:
        rest = list(reversed(rev[rpos:]))
        out[split] = product_of(rest) if rest else Dim(1)
    elif rpos < len(rev) and any(d.size != 1 for d in rev[rpos:]):
        raise DimConflict("reshape leaves factors unused")
    flow.out(node, out)


def consume(flow, seq, pos, e: Elem, node, reverse=False):
    """Match one target element against the factors `seq[pos:]`: (its Dim, the new position)."""
    if e.dim is not None:
        want = factors(e.dim)
        if reverse:
            want = list(reversed(want))
        for w in want:
            while pos < len(seq) and seq[pos].size == 1 and seq[pos].root().kind is None and w.size != 1 \
                    and seq[pos].root() is not w.root():
                pos += 1  # a unit axis (tf2onnx's unsqueezed einsum axes) multiplies nothing, as in take()
            if pos < len(seq) and (seq[pos].root() is w.root() or seq[pos].size == w.size):
                unify(seq[pos], w)
                pos += 1
            elif w.size is not None:
                taken, pos = take(seq, pos, w.size, reverse)
                unify(w, product_of(taken))
            else:
                raise DimConflict(f"cannot place {w}")
        return e.dim.root(), pos
    if e.value is None:
        raise DimConflict("reshape element unknown")
    if e.value == 1:
        # a literal 1 is the next unit axis where there is one (a static batch of 1), else a new one
        if pos < len(seq) and seq[pos].size == 1:
            return seq[pos].root(), pos + 1
        return Dim(1), pos
    taken, pos = take(seq, pos, e.value, reverse)
    d = product_of(list(reversed(taken)) if reverse else taken)
    flow.mean(e, Meaning("size", [d]), node)
    return d, pos


@RULES.register("Expand")
def expand(flow, node, ins):
    x = ins[0]
    target = flow.elems(node.inputs[1])
    if x is None or target is None:
        return flow.fail(node, "target shape not computable")
    rank = max(len(x), len(target))
    xs = [None] * (rank - len(x)) + list(x)
    ts = [None] * (rank - len(target)) + list(target)
    out = []
    for d, e in zip(xs, ts):
        if e is None:
            out.append(d)
        elif e.dim is not None:
            if d is not None and d.size != 1:
                unify(d, e.dim)
            out.append(e.dim if (d is None or d.size == 1) else d)
        elif e.value == 1 or e.value == -1:
            out.append(d if d is not None else Dim(1))
        elif d is not None and d.size != 1:
            flow.mean(e, Meaning("size", [d]), node)
            out.append(d)
        else:
            new = Dim(e.value)
            flow.mean(e, Meaning("size", [new]), node)
            out.append(new)
    flow.out(node, out)


@RULES.register("ConstantOfShape")
def constant_of_shape(flow, node, ins):
    target = flow.elems(node.inputs[0])
    if target is None:
        return flow.fail(node, "target shape not computable")
    fill = attr(node, "value")
    fill = 0 if fill is None else fill.numpy().reshape(-1)[0].item()
    if len(target) == 1 and target[0].value is not None and target[0].value <= SMALL_INT_TENSOR \
            and float(fill).is_integer():
        flow.vals[node.outputs[0]] = [Elem(value=int(fill)) for _ in range(target[0].value)]
    out = []
    for e in target:
        if e.dim is not None:
            out.append(e.dim)
        else:
            new = Dim(e.value)
            if e.value not in (None, 0, 1):
                flow.mean(e, Meaning("size", [new]), node)
            out.append(new)
    flow.out(node, out)


@RULES.register("Range")
@RULES.register("Range", domain=MICROSOFT)
def range_(flow, node, ins):
    start, limit, delta = (flow.elems(optional_input(node, i)) for i in range(3))
    if start and limit and delta and all(e[0].value is not None for e in (start, limit, delta)):
        n = max(0, -(-(limit[0].value - start[0].value) // delta[0].value))
        d = Dim(n)
        if limit[0].literal:
            flow.mean(limit[0], Meaning("size", [d]), node)
        flow.out(node, [d])
    elif limit and limit[0].dim is not None and start and start[0].value == 0:
        flow.out(node, [limit[0].dim])  # range(0, size): one position per element of that axis
    else:
        flow.out(node, [Dim(None)])


@RULES.register("Flatten")
def flatten(flow, node, ins):
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    axis = attr(node, "axis", 1) % (len(x) + 1)
    flow.out(node, [product_of([f for d in x[:axis] for f in factors(d)] or [Dim(1)]),
                    product_of([f for d in x[axis:] for f in factors(d)] or [Dim(1)])])


@RULES.register("Unsqueeze")
def unsqueeze_1(flow, node, ins):
    unsqueeze(flow, node, ins[0], attr(node, "axes"))


@RULES.register("Unsqueeze", since=13)
def unsqueeze_13(flow, node, ins):
    unsqueeze(flow, node, ins[0], flow.ints(optional_input(node, 1)))


def unsqueeze(flow, node, x, axes):
    if x is None or axes is None:
        return flow.fail(node, "input shape or axes unknown")
    rank = len(x) + len(axes)
    out = list(x)
    for a in sorted(a % rank for a in axes):
        out.insert(a, Dim(1))
    flow.out(node, out)
    flow.pass_values(node)


@RULES.register("Squeeze")
def squeeze_1(flow, node, ins):
    squeeze(flow, node, ins[0], attr(node, "axes"))


@RULES.register("Squeeze", since=13)
def squeeze_13(flow, node, ins):
    squeeze(flow, node, ins[0], flow.ints(optional_input(node, 1)))


def squeeze(flow, node, x, axes):
    if x is None:
        return flow.fail(node, "input shape unknown")
    if axes is None:  # no axes (or axes computed at run time): the axes of size 1
        axes = [i for i, d in enumerate(x) if d.size == 1]
    axes = [a % len(x) for a in axes]
    flow.out(node, [d for i, d in enumerate(x) if i not in axes])
    flow.pass_values(node)


@RULES.register("Transpose")
def transpose(flow, node, ins):
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    perm = attr(node, "perm") or list(reversed(range(len(x))))
    flow.out(node, [x[p] for p in perm])


@RULES.register("Tile")
def tile(flow, node, ins):
    reps = flow.ints(node.inputs[1])
    if ins[0] is None or reps is None:
        return flow.fail(node, "repeats not computable")
    out = []
    for d, r in zip(ins[0], reps):
        if r == 1:
            out.append(d)
        else:
            out.append(Dim(None if d.size is None else d.size * r))
            flow.problems_if_resized(node, d, "tiled axis")
    flow.out(node, out)
