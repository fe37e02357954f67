"""What a Hugging Face config needs beyond the TransformerSpec, read off the graph's nodes and constants.

    norm_epsilon(spec, norm)   the epsilon of a norm op (LayerNormalization, ONNX Runtime's Skip and Embed
                               norms, ...), or the constant a decomposed norm adds to its variance (or
                               mean square)
    rotary(spec)               the rotary base and rotated width, from the frequencies the Cos reads
                               (or an opset-23 RotaryEmbedding's cos/sin tables)
    qkv_layout(spec, att)      how a fused QKV projection is split: contiguous thirds (GPT-2) or
                               [heads, 3, head_dim] (GPT-NeoX)
    position_offset(spec)      the constant added to position ids before the table lookup (OPT's 2)

Nothing here reads an initializer's name.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedGraph
from ..dims import same
from ..structure import Attention, Norm, TransformerSpec, is_packed_weight_attention, output_width, producers_back
from ..views import SHAPE_OF

# each norm op with the epsilon it uses when the attribute is absent: the ONNX default for the standard
# ops, ONNX Runtime's kDefault*Epsilon (1e-12) for its com.microsoft fused norms
NORM_OPS = {"LayerNormalization": 1e-5, "SimplifiedLayerNormalization": 1e-5, "RMSNormalization": 1e-5,
            "SkipLayerNormalization": 1e-12, "SkipSimplifiedLayerNormalization": 1e-12,
            "EmbedLayerNormalization": 1e-12}
MAX_NORM_NODES = 40  # a decomposed norm is about a dozen nodes; a walk past that left the norm


def constant(spec: TransformerSpec, value: ir.Value | None) -> np.ndarray | None:
    """The value behind `value` when it is a constant (lifted to an initializer by normalize)."""
    if value is None:
        return None
    init, _ = spec.flow.source_initializer(value)
    if init is None or init.const_value is None:
        return None
    return init.const_value.numpy()


def nodes_between(start: ir.Value, end: ir.Value) -> list[ir.Node]:
    """The nodes that compute `end` from `start` (and constants), walking back from `end`."""
    found, seen, todo = [], set(), deque([end])
    while todo and len(found) < MAX_NORM_NODES:
        v = todo.popleft()
        node = v.producer() if v is not None and v is not start else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        if node.op_type not in SHAPE_OF:
            todo.extend(i for i in node.inputs if i is not None and not i.is_initializer())
    return found


def shortest(x) -> float:
    """A float32 constant as the decimal it was written as (1e-12, not 9.99999996e-13)."""
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def norm_epsilon(spec: TransformerSpec, norm: Norm) -> float:
    # an EmbedLayerNormalization's norm has no input of its own (the sum of the lookups is inside the op:
    # input is output), so the op that writes the output is looked at first
    nodes = [n for n in [norm.output.producer()] if n is not None] + nodes_between(norm.input, norm.output)
    for node in nodes:
        if node.op_type in NORM_OPS:
            eps = node.attributes.get("epsilon")
            return shortest(eps.value) if eps is not None else NORM_OPS[node.op_type]
    for node in nodes:
        if node.op_type != "Add":
            continue
        for i, v in enumerate(node.inputs):
            other = node.inputs[1 - i]
            value = constant(spec, other)
            if v.producer() is not None and v.producer().op_type == "ReduceMean" \
                    and value is not None and value.size == 1:
                return shortest(value.reshape(()))
    raise UnsupportedGraph("the norm's epsilon was not found (no norm op, no constant added to a mean)",
                           norm.output.producer())


def rotary(spec: TransformerSpec) -> tuple[float, int, int | None]:
    """(base, rotated width, rows of a cos table or None) of the rotary embedding."""
    graph = spec.model.graph
    for node in graph:
        if node.op_type == "Cos":
            freqs = frequencies_behind(spec, node)
            return geometric_base(freqs, node) + (None,)
    for node in graph:
        if node.op_type == "RotaryEmbedding":
            cos, sin = constant(spec, node.inputs[2]), constant(spec, node.inputs[3])
            if cos is None or sin is None or cos.ndim != 2 or cos.shape[0] < 2:
                break
            # row 1 holds cos and sin of 1 * inv_freq; every frequency is below pi
            freqs = np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))
            return geometric_base(freqs, node) + (cos.shape[0],)
    folded = folded_tables(spec)
    if folded is not None:
        cos, sin = folded
        n = cos.shape[-1] // 2  # HF's tables are cat(angles, angles)
        freqs = np.arctan2(sin[1, :n].astype(np.float64), cos[1, :n].astype(np.float64))
        return geometric_base(freqs, spec.blocks[0].attention.q_proj) + (None,)
    raise UnsupportedGraph("rotary frequencies not found (no Cos of position x frequency, no constant cos table)")


def folded_tables(spec: TransformerSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """The cos and sin tables a static-shape export folded into constants ([..., positions, width]),
    found as the constant factors of the Muls between the Q projection and the scores: cos starts
    with a row of ones (position 0), sin with a row of zeros."""
    tables, seen, todo = [], set(), deque(spec.blocks[0].attention.q_proj.outputs)
    while todo:
        for node in todo.popleft().consumers():
            if id(node) in seen or node.op_type == "MatMul":
                continue
            seen.add(id(node))
            if node.op_type == "Mul":
                tables += [t for t in (constant(spec, i) for i in node.inputs) if t is not None and t.ndim >= 2]
            todo.extend(node.outputs)
    rows = [t.reshape(-1, t.shape[-1]) for t in tables]
    cos = [t for t in rows if t.shape[0] >= 2 and np.all(t[0] == 1)]
    sin = [t for t in rows if t.shape[0] >= 2 and np.all(t[0] == 0)]
    return (cos[0], sin[0]) if cos and sin else None


def frequencies_behind(spec: TransformerSpec, cos: ir.Node) -> np.ndarray:
    """The float constant (inv_freq) the angles fed to `cos` are computed from."""
    seen, todo = set(), deque([cos.inputs[0]])
    while todo:
        v = todo.popleft()
        value = constant(spec, v)
        if value is not None and value.dtype.kind == "f" and value.size >= 2:
            return value.reshape(-1).astype(np.float64)
        node = v.producer()
        if node is None or id(node) in seen or node.op_type in SHAPE_OF:
            continue
        seen.add(id(node))
        todo.extend(i for i in node.inputs if i is not None)
    raise UnsupportedGraph("the rotary frequencies behind this Cos are not a constant", cos)


def geometric_base(freqs: np.ndarray, node: ir.Node) -> tuple[float, int]:
    """inv_freq[i] = base ** (-i / n) for n frequencies over a rotated width of 2n (plain RoPE)."""
    n = len(freqs)
    if n < 2 or abs(freqs[0] - 1.0) > 1e-5 or np.any(freqs <= 0):
        raise UnsupportedGraph(f"rotary frequencies {freqs[:3].tolist()}... are not a plain RoPE series", node)
    base = float(freqs[1] ** -n)
    expected = base ** (-np.arange(n) / n)
    if not np.allclose(freqs, expected, rtol=1e-4):
        raise UnsupportedGraph("rotary frequencies are not base^(-2i/d) (scaled RoPE has no plain config here)", node)
    return float(np.float32(base)) if abs(base - round(base)) > 1e-3 * base else float(round(base)), 2 * n


def qkv_layout(spec: TransformerSpec, att: Attention) -> str:
    """'contiguous' when the fused output is split on an axis as wide as the projection (GPT-2),
    'per_head' when it is split after a view as [..., heads, 3 * head_dim] (GPT-NeoX). com.microsoft
    Attention's packed weight is [in, q | k | v]: contiguous."""
    if is_packed_weight_attention(att.q_proj):
        return "contiguous"
    width = output_width(spec.flow, att.q_proj)
    v = att.q_proj.outputs[0]
    for _ in range(8):
        consumers = [c for c in v.consumers() if c.op_type not in SHAPE_OF]
        if not consumers:
            break
        node = consumers[0]
        if node.op_type in ("Split", "Slice", "Gather"):
            dims = spec.flow.dims.get(v) or []
            return "contiguous" if dims and same(dims[-1], width) else "per_head"
        v = node.outputs[0]
    raise UnsupportedGraph("the fused QKV projection's split was not found", att.q_proj)


def position_offset(spec: TransformerSpec) -> int:
    """The integer constant added to the position ids on their way into the position table."""
    table = spec.position_embedding
    lookups = [c for c in table.consumers() if c.op_type == "Gather"] if table is not None else []
    if not lookups:
        return 0  # a folded lookup (static export) reads rows from 0
    v = lookups[0].inputs[1]
    for _ in range(8):
        node = v.producer()
        if node is None:
            break
        if node.op_type in ("Add", "Sub"):
            value = constant(spec, node.inputs[1])
            if value is not None and value.size == 1:
                return int(value.reshape(())) * (1 if node.op_type == "Add" else -1)
            break
        if node.op_type not in ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand"):
            break
        v = node.inputs[0]
    return 0


def embedding_scale(spec: TransformerSpec) -> float:
    """A constant the token embeddings are multiplied by before the first block (Gemma's sqrt(hidden)), else 1."""
    v = spec.token_embedding
    for _ in range(4):
        nodes = [c for c in v.consumers() if c.op_type not in SHAPE_OF]
        if len(nodes) != 1:
            return 1.0
        node = nodes[0]
        if node.op_type == "Mul":
            value = constant(spec, node.inputs[1] if node.inputs[0] is v else node.inputs[0])
            return float(value.reshape(())) if value is not None and value.size == 1 else 1.0
        if node.op_type not in ("Gather", "Cast"):
            return 1.0
        v = node.outputs[0]
    return 1.0


def padding_id(spec: TransformerSpec) -> int | None:
    """The token id that position ids skip (RoBERTa: positions count the tokens that are not padding),
    read from the Equal that compares the ids with a constant on the way into the position table."""
    table = spec.position_embedding
    lookups = [c for c in table.consumers() if c.op_type == "Gather"] if table is not None else []
    if not lookups:
        return None

    def scalar(node):  # the constant an Equal compares the ids with
        values = [constant(spec, i) for i in node.inputs] if node.op_type == "Equal" else []
        return next((int(x.reshape(())) for x in values if x is not None and x.size == 1), None)
    found = producers_back(lookups[0].inputs[1], lambda node: scalar(node) is not None)
    return scalar(found[0]) if found else None
