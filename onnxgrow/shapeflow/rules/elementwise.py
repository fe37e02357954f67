"""Elementwise ops and reductions.

A unary op keeps its input's axes; a broadcasting op unifies the axes that line up from the right
(an axis of size 1 stretches). When the inputs are shape vectors (sizes read with Shape at run
time), the arithmetic is followed element by element, so `Shape(x)[2] * 64` or `hidden // heads`
still names the Dims it computes:

    size * size       -> their product               (batch * heads)
    size * literal    -> product with a new Dim      (kv_heads * n_rep: the literal means that Dim)
    size // literal   -> the size less a leading factor   (heads*head_dim // heads = head_dim)
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ...dims import Dim, factors, product_of, same, unify
from ...registry import MICROSOFT
from ..core import RULES, SMALL_INT_TENSOR, Elem, Meaning, attr

UNARY = {"Cast", "Neg", "Sqrt", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Relu", "Exp", "Log", "Cos",
         "Sin", "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Not", "Identity", "Abs", "Gelu", "Trilu",
         "CumSum", "Floor", "Ceil", "Round", "Sign", "HardSigmoid", "Softplus", "Elu", "LeakyRelu",
         "Dropout", "CastLike"}
# ONNX Runtime contrib ops that keep their input's shape (its fused activations: rules/fused.py)
MICROSOFT_UNARY = {"Trilu"}
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual",
             "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Where", "Mod", "BitShift",
             "PRelu", "Sum", "Mean"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
          "ReduceSumSquare", "ReduceLogSumExp"}
VALUE_KEEPING = {"Cast", "Identity", "CastLike"}  # a shape vector goes through with its elements

# shape arithmetic followed on known values
ARITH = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
         "Div": lambda x, y: x // y if y else None, "Equal": lambda x, y: int(x == y),
         "Max": max, "Min": min}


@RULES.register(*sorted(UNARY - VALUE_KEEPING))
@RULES.register(*sorted(MICROSOFT_UNARY), domain=MICROSOFT)
def unary(flow, node, ins):
    if ins[0] is None:
        return flow.fail(node, "input shape unknown")
    flow.out(node, list(ins[0]))


@RULES.register(*sorted(VALUE_KEEPING))
def cast(flow, node, ins):
    if ins[0] is None:
        return flow.fail(node, "input shape unknown")
    flow.out(node, list(ins[0]))
    flow.pass_values(node)


@RULES.register(*sorted(BROADCAST))
def broadcast(flow, node, ins):
    known = [s for s in ins if s is not None]
    if len(known) != len([v for v in node.inputs if v is not None]):
        return flow.fail(node, "input shape unknown")
    flow.out(node, flow.broadcast(known))
    if node.op_type == "Where":
        where_values(flow, node)
    elif node.op_type in ARITH:
        shape_arithmetic(flow, node)


def where_values(flow, node):
    cond, a, b = (flow.elems(v) for v in node.inputs)
    if cond is None:
        cond = constant_condition(node.inputs[0])
    if a is not None and b is not None and cond is not None and len(a) == len(b) == len(cond) \
            and all(c.value is not None for c in cond):
        # exporters write Where(Equal(shape, -1), 1, shape) to resolve -1 in an Expand target
        flow.vals[node.outputs[0]] = [x if c.value else y for c, x, y in zip(cond, a, b)]


def constant_condition(v) -> list[Elem] | None:
    """A Where's condition folded into a bool constant (onnxslim and onnxsim fold the Equal(shape, -1)
    of an Expand target once its -1s are known). Bools are not shape literals: they get no leaf, so
    no rewrite changes them."""
    t = v.const_value if v is not None and v.is_initializer() else None
    if t is None or t.dtype != ir.DataType.BOOL or t.size > SMALL_INT_TENSOR:
        return None
    return [Elem(value=int(x)) for x in t.numpy().reshape(-1)]


def shape_arithmetic(flow, node):
    """Follow Add/Sub/Mul/Div/Equal/Max/Min on shape vectors, one element pair at a time."""
    op = node.op_type
    a, b = (flow.elems(v) for v in node.inputs[:2])
    if a is None or b is None:
        return
    if len(a) == 1 and len(b) > 1:
        a = a * len(b)
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    if len(a) != len(b):
        return
    flow.vals[node.outputs[0]] = [element_arithmetic(flow, node, op, x, y) for x, y in zip(a, b)]


def element_arithmetic(flow, node, op: str, x: Elem, y: Elem) -> Elem:
    value = None
    if op == "Equal" and ((x.dim is not None and y.literal and y.value < 0) or
                          (y.dim is not None and x.literal and x.value < 0)):
        value = 0  # a size is never negative: Equal(shape, -1) is false
    elif x.value is not None and y.value is not None:
        value = ARITH[op](x.value, y.value)
    dim = None
    if op in ("Max", "Min") and x.dim is not None and y.dim is not None and (
            same(x.dim, y.dim) or (x.dim.size == y.dim.size and x.dim.size not in (None, 1))):
        # tf2onnx's BatchMatMul takes the broadcast batch size as Max of two sizes that must agree
        unify(x.dim, y.dim)
        return Elem(dim=x.dim, value=x.value)
    if op == "Mul":
        dim = multiply(flow, node, x, y)
    elif op == "Div" and x.dim is not None and y.literal:
        dim = divide(flow, x.dim, y, node)
    if dim is None and value is None and (x.dim is not None or y.dim is not None):
        dim = Dim(None)  # e.g. past + new sequence length: some size, known at run time
    product = (x, y) if op == "Mul" and x.literal and y.literal else None
    return Elem(dim=dim, value=value, factors=product)


def multiply(flow, node, x: Elem, y: Elem) -> Dim | None:
    if x.dim is not None and y.dim is not None:
        return product_of([x.dim, y.dim])
    if x.dim is not None and y.value == 1:
        return x.dim
    if (x.dim is not None) != (y.dim is not None) and (x.literal or y.literal):
        # size * literal (kv_heads * n_rep): the literal becomes a Dim of its own
        sized, lit = (x, y) if x.dim is not None else (y, x)
        factor = Dim(lit.value)
        flow.mean(lit, Meaning("size", [factor]), node)
        return product_of([sized.dim, factor] if sized is x else [factor, sized.dim])
    return None


def divide(flow, dim: Dim, lit: Elem, node) -> Dim | None:
    """size // literal: the literal must be a leading factor of the dim (heads in heads*head_dim)."""
    fs = factors(dim)
    if fs and fs[0].size == lit.value:
        flow.mean(lit, Meaning("size", [fs[0]]), node)
        return product_of(fs[1:]) if len(fs) > 1 else Dim(1)
    return None


@RULES.register(*sorted(REDUCE))
def reduce(flow, node, ins):
    """Reduce over `axes`, an attribute before opset 18 (13 for ReduceSum) and an input since."""
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    axes = attr(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = flow.ints(node.inputs[1])
        if axes is None:
            return flow.fail(node, "reduction axes are not constant")
    if not axes and axes is not None and attr(node, "noop_with_empty_axes", 0):
        return flow.out(node, list(x))
    reduced(flow, node, x, range(len(x)) if axes is None else axes)
    if node.op_type == "ReduceProd" and len(x) == 1:
        shape_product(flow, node)


def shape_product(flow, node):
    """ReduceProd of a shape vector (tf2onnx flattens [batch, seq] to batch * seq with it): the
    product of the sizes it picks, a product Dim when each is a Dim."""
    es = flow.elems(node.inputs[0])
    if not es:
        return
    value = math.prod(e.value for e in es) if all(e.value is not None for e in es) else None
    dim = product_of([e.dim for e in es]) if all(e.dim is not None for e in es) else None
    if dim is None and value is None:
        dim = Dim(None)
    flow.vals[node.outputs[0]] = [Elem(dim=dim, value=value)]


@RULES.register("ArgMax", "ArgMin")
def arg_reduce(flow, node, ins):
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    reduced(flow, node, x, [attr(node, "axis", 0)])


def reduced(flow, node, x, axes):
    axes = [a % len(x) for a in axes]
    keep = attr(node, "keepdims", 1)
    flow.out(node, [Dim(1) if i in axes else d for i, d in enumerate(x) if keep or i not in axes])
