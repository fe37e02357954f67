"""ONNX Runtime's fused norms and activations (onnxruntime.transformers.optimizer writes them).

Their parameters are vectors of the hidden (or FFN) width: each is unified with the last axis of the
activation it applies to, so a resize of that Dim resizes the parameter too.

    SkipLayerNormalization          input, skip, gamma, beta?, bias?  -> output, mean?, inv_std_var?, sum?
    SkipSimplifiedLayerNormalization input, skip, gamma, bias?        -> output, mean?, inv_std_var?, sum?
    EmbedLayerNormalization         ids, segment ids?, word, position, segment?, gamma, beta, mask?,
                                    position ids?  -> output, mask_index, embedding_sum?

The last output of a Skip*Normalization, input + skip + bias, is the residual stream.
"""

from __future__ import annotations

from ...dims import Dim, unify
from ...registry import MICROSOFT
from ..core import RULES
from .norms import layer_norm

# ONNX Runtime runs its contrib LayerNormalization like the standard one
RULES.register("LayerNormalization", domain=MICROSOFT)(layer_norm)


def unify_vectors(x: list[Dim], params) -> None:
    """Each parameter vector (or a trailing part of a broadcast input) measures x's trailing axes."""
    for p in params:
        if p is not None:
            for d, e in zip(reversed(p), reversed(x)):
                unify(d, e)


def skip_norm_outputs(flow, node, x: list[Dim]) -> None:
    flow.out(node, list(x))
    for i in (1, 2):  # mean and inverse std: the hidden axis becomes 1
        if i < len(node.outputs):
            flow.out(node, x[:-1] + [Dim(1)], i)
    if len(node.outputs) > 3:
        flow.out(node, list(x), 3)


@RULES.register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MICROSOFT)
def skip_layer_norm(flow, node, ins):
    x = ins[0]
    if x is None or ins[1] is None:
        return flow.fail(node, "input shape unknown")
    unify_vectors(x, ins[1:])  # skip (maybe [seq, hidden]), gamma, beta, bias: all end in hidden
    skip_norm_outputs(flow, node, x)


@RULES.register("EmbedLayerNormalization", domain=MICROSOFT)
def embed_layer_norm(flow, node, ins):
    ids, word = ins[0], (ins[2] if len(ins) > 2 else None)
    if ids is None or word is None or len(ids) != 2:
        return flow.fail(node, "input ids or word table shape unknown")
    hidden = word[1]
    for i in (3, 4):  # position and segment tables: [rows, hidden]
        if i < len(ins) and ins[i] is not None:
            unify(ins[i][1], hidden)
    unify_vectors([hidden], ins[5:7])  # gamma, beta
    for i in (1, 7, 8):  # segment ids, mask, position ids: [batch, seq] like the ids
        if i < len(ins) and ins[i] is not None and len(ins[i]) == 2:
            unify(ins[i][0], ids[0]), unify(ins[i][1], ids[1])
    flow.out(node, [ids[0], ids[1], hidden])
    if len(node.outputs) > 1:
        flow.out(node, [ids[0]], 1)  # mask_index: one length per sequence
    if len(node.outputs) > 2:
        flow.out(node, [ids[0], ids[1], hidden], 2)


@RULES.register("FastGelu", "BiasGelu", "Gelu", "QuickGelu", domain=MICROSOFT)
def gelu(flow, node, ins):
    """FastGelu(x, bias?) and BiasGelu(x, bias): the bias is a vector of x's last axis."""
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    unify_vectors(x, ins[1:])
    flow.out(node, list(x))


@RULES.register("BiasAdd", domain=MICROSOFT)
def bias_add(flow, node, ins):
    """BiasAdd(x, bias, skip) = x + bias + skip, all of x's shape but the bias ([channels])."""
    x = ins[0]
    if x is None:
        return flow.fail(node, "input shape unknown")
    unify_vectors(x, ins[1:])
    flow.out(node, list(x))
