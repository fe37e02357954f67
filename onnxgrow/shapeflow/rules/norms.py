"""Normalizations: the scale and bias measure the normalized trailing axes of the input."""

from __future__ import annotations

from ...dims import Dim, unify
from ...registry import MICROSOFT
from ..core import RULES, attr


# ONNX Runtime writes SimplifiedLayerNormalization (RMSNorm) in the standard domain; accepted in its
# contrib domain as well
@RULES.register("LayerNormalization", "SimplifiedLayerNormalization")
@RULES.register("SimplifiedLayerNormalization", domain=MICROSOFT)
@RULES.register("RMSNormalization", since=23)  # LayerNormalization without bias; stash_type is a dtype
def layer_norm(flow, node, ins):
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    axis = attr(node, "axis", -1) % len(x)
    for p in ins[1:]:
        if p is not None:
            for d, e in zip(reversed(p), reversed(x[axis:])):
                unify(d, e)
    flow.out(node, list(x))
    for i in range(1, len(node.outputs)):  # mean and inverse std: the normalized axes become 1
        flow.out(node, x[:axis] + [Dim(1)] * (len(x) - axis), i)


# tf2onnx writes a LayerNorm's moments (tf.nn.moments over the last axis of [batch, seq, hidden]) as
# GlobalAveragePool, which averages every axis after the first two: over hidden, in a 3-D tensor
@RULES.register("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def global_pool(flow, node, ins):
    x = ins[0]
    if x is None or len(x) < 3:
        return flow.fail(node, "input shape unknown")
    flow.out(node, list(x[:2]) + [Dim(1)] * (len(x) - 2))
