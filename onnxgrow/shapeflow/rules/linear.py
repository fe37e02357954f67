"""Matrix products: the contracted axes of the two operands are one Dim.

A weight read by MatMul/Gemm (directly, or through Transpose/Cast) also records which of its axes
is summed over (`flow.contracted`): a resize must treat that axis as an input axis, whose new rows
meet inputs the original weight never saw.
"""

from __future__ import annotations

from ...dims import Dim, unify
from ..core import RULES, attr


@RULES.register("MatMul")
def matmul(flow, node, ins):
    a, b = ins[0], ins[1]
    if a is None or b is None:
        return flow.fail(node, "input shape unknown")
    a1, b1 = len(a) == 1, len(b) == 1  # a vector is promoted to a matrix, then the 1 dropped
    A = [Dim(1)] + a if a1 else a
    B = b + [Dim(1)] if b1 else b
    unify(A[-1], B[-2])
    flow.mark_contracted(node.inputs[0], -1)
    flow.mark_contracted(node.inputs[1], 0 if b1 else -2)
    batch = flow.broadcast([A[:-2], B[:-2]]) if (len(A) > 2 or len(B) > 2) else []
    flow.out(node, batch + ([] if a1 else [A[-2]]) + ([] if b1 else [B[-1]]))


@RULES.register("Gemm")
def gemm(flow, node, ins):
    a, b = ins[0], ins[1]
    if a is None or b is None:
        return flow.fail(node, "input shape unknown")
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    m, ka = (a[1], a[0]) if ta else (a[0], a[1])
    kb, n = (b[1], b[0]) if tb else (b[0], b[1])
    unify(ka, kb)
    flow.mark_contracted(node.inputs[0], 0 if ta else 1)
    flow.mark_contracted(node.inputs[1], 1 if tb else 0)
    out = [m, n]
    if len(node.inputs) > 2 and node.inputs[2] is not None and ins[2] is not None:
        out = flow.broadcast([out, ins[2]])
    flow.out(node, out)


@RULES.register("Einsum")
def einsum(flow, node, ins):
    """An explicit equation ("abc,cde->abde": Keras' MultiHeadAttention projection by a [hidden, heads,
    head_dim] kernel): axes under one letter are one Dim; a weight's letters missing from the output
    are summed over (contracted)."""
    equation = (attr(node, "equation") or "").replace(" ", "")
    if "->" not in equation or "." in equation:
        return flow.fail(node, "Einsum without an explicit output, or with an ellipsis, is not analysed")
    if any(s is None for s in ins):
        return flow.fail(node, "input shape unknown")
    terms, output = equation.split("->")
    terms = terms.split(",")
    if len(terms) != len(ins) or any(len(t) != len(s) for t, s in zip(terms, ins)):
        return flow.fail(node, "the equation does not fit the inputs' ranks")
    by_letter: dict[str, Dim] = {}
    for term, shape in zip(terms, ins):
        for letter, d in zip(term, shape):
            if letter not in by_letter or by_letter[letter].size == 1:
                by_letter[letter] = d
            elif d.size != 1:
                unify(by_letter[letter], d)
    for i, term in enumerate(terms):
        for axis, letter in enumerate(term):
            if letter not in output:
                flow.mark_contracted(node.inputs[i], axis)
    flow.out(node, [by_letter[letter] for letter in output])
