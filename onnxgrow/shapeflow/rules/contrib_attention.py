"""ONNX Runtime's fused attention ops (com.microsoft): GroupQueryAttention, MultiHeadAttention, Attention
(the projection inside the op) and RotaryEmbedding.

GroupQueryAttention (what the onnxruntime-genai builder writes) takes the query, key and value either
packed in one tensor or apart:

    packed:   query [b, s, (num_heads + 2 kv_num_heads) * head_dim]   key, value left out
    separate: query [b, s, num_heads * head_dim]   key, value [b, s, kv_num_heads * head_dim]

The packed axis is a concatenation q | k | v (as a fused QKV projection's output is), each segment
heads x head_dim. Query heads are kv_num_heads x group (query head h reads key/value head h // group,
so kv heads are the outer factor, the layout attention.group_heads sets up). past_key/past_value and
present_key/present_value are [b, kv_heads, s_total, head_dim]; seqlens_k and total_sequence_length
are counts, not model sizes. With do_rotary, cos_cache/sin_cache are [max_positions, rotary_dim / 2],
which no Dim can say: resizing head_dim through them is refused, as for RotaryEmbedding.

MultiHeadAttention takes separate query [b, s, num_heads * head_dim], key and value (3-D, or 4-D
[b, heads, s_kv, head_dim] when they are already split into heads), and with 3-D ones an optional bias
[q | k | v] (the projections' biases, moved into the op by ORT's optimizer); past/present as above.

The head-count attributes (num_heads, kv_num_heads) are literals the Resizer rewrites (see
attention.mean_attribute).
"""

from __future__ import annotations

from ...dims import Dim, DimConflict, product_of, refine, unify
from ...registry import MICROSOFT
from ..core import RULES, Meaning, attr, optional_input
from .attention import ROTARY_HALF, group_heads, heads_of, mean_attribute


def packed_qkv(width: Dim, num_heads: int, kv_num_heads: int) -> tuple[Dim, Dim, Dim]:
    """(q_heads, kv_heads, head_dim) of a packed q | k | v axis."""
    if width.size is None or width.size % (num_heads + 2 * kv_num_heads):
        raise DimConflict(f"{width} is not {num_heads} + 2 x {kv_num_heads} heads wide")
    head_size = width.size // (num_heads + 2 * kv_num_heads)
    q, k, v = refine(width, "cat", [num_heads * head_size, kv_num_heads * head_size, kv_num_heads * head_size])
    q_heads, head_dim = heads_of(q, num_heads)
    kv_heads, k_dim = heads_of(k, kv_num_heads)
    v_heads, v_dim = heads_of(v, kv_num_heads)
    unify(k_dim, head_dim), unify(v_dim, head_dim), unify(v_heads, kv_heads)
    return q_heads, kv_heads, head_dim


def separate_qkv(q: list[Dim], k: list[Dim], v: list[Dim], num_heads: int, kv_num_heads: int):
    """(q_heads, kv_heads, head_dim) of separate 3-D query, key and value."""
    for a, b in ((q[0], k[0]), (k[0], v[0]), (k[1], v[1])):
        unify(a, b)
    q_heads, head_dim = heads_of(q[-1], num_heads)
    kv_heads, k_dim = heads_of(k[-1], kv_num_heads)
    v_heads, v_dim = heads_of(v[-1], kv_num_heads)
    unify(k_dim, head_dim), unify(v_dim, head_dim), unify(v_heads, kv_heads)
    return q_heads, kv_heads, head_dim


def cache_layout(flow, node, ins, past_index: int, batch: Dim, kv_heads: Dim, head_dim: Dim):
    """past_key/past_value inputs and present_key/present_value outputs (1, 2): [b, kv_heads, s, head_dim]."""
    total = Dim(None)
    for p in (optional_input(node, past_index), optional_input(node, past_index + 1)):
        shape = flow.shape(p)
        if shape is not None and len(shape) == 4:
            unify(shape[0], batch), unify(shape[1], kv_heads), unify(shape[3], head_dim)
    for i in (1, 2):
        if len(node.outputs) > i and node.outputs[i] is not None:
            flow.out(node, [batch, kv_heads, total, head_dim], i)


def rotary_caches(flow, node, cos: list[Dim] | None, head_dim: Dim, always: bool = False):
    if always or attr(node, "do_rotary", 0):
        flow.problems_if_resized(node, head_dim, ROTARY_HALF)
        if cos is not None:
            flow.problems_if_resized(node, cos[-1], ROTARY_HALF)


@RULES.register("GroupQueryAttention", domain=MICROSOFT)
def group_query_attention(flow, node, ins):
    q = ins[0]
    k, v = (ins[i] if len(ins) > i else None for i in (1, 2))
    num_heads, kv_num_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
    if q is None or len(q) != 3 or num_heads is None or kv_num_heads is None:
        return flow.fail(node, "a GroupQueryAttention node whose query is not 3-D or that lacks num_heads/kv_num_heads")
    if k is None and v is None:
        q_heads, kv_heads, head_dim = packed_qkv(q[-1], num_heads, kv_num_heads)
    elif k is not None and v is not None and len(k) == len(v) == 3:
        q_heads, kv_heads, head_dim = separate_qkv(q, k, v, num_heads, kv_num_heads)
    else:
        return flow.fail(node, "a GroupQueryAttention node with 4-D or partly given key/value")
    group_heads(q_heads, kv_heads)
    mean_attribute(flow, node, "num_heads", q_heads)
    mean_attribute(flow, node, "kv_num_heads", kv_heads)
    batch = q[0]
    flow.out(node, [batch, q[1], product_of([q_heads, head_dim])])
    cache_layout(flow, node, ins, 3, batch, kv_heads, head_dim)
    rotary_caches(flow, node, ins[7] if len(ins) > 7 else None, head_dim)


@RULES.register("MultiHeadAttention", domain=MICROSOFT)
def multi_head_attention(flow, node, ins):
    q = ins[0]
    k, v = (ins[i] if len(ins) > i else None for i in (1, 2))
    num_heads = attr(node, "num_heads")
    if q is None or len(q) != 3 or k is None or v is None or num_heads is None:
        return flow.fail(node, "a MultiHeadAttention node other than separate 3-D query with key and value")
    q_heads, head_dim = heads_of(q[-1], num_heads)
    unify(q[0], k[0]), unify(k[0], v[0])
    if len(k) == 3 and len(v) == 3:
        kv_heads, k_dim = heads_of(k[-1], num_heads)
        v_heads, v_dim = heads_of(v[-1], num_heads)
        unify(k[1], v[1]), unify(v_heads, kv_heads)
    elif len(k) == 4 and len(v) == 4:
        kv_heads, k_dim, v_heads, v_dim = k[1], k[-1], v[1], v[-1]
        unify(v_heads, kv_heads), unify(k[2], v[2])
    else:
        return flow.fail(node, f"a MultiHeadAttention node with {len(k)}-D key and {len(v)}-D value")
    unify(kv_heads, q_heads), unify(k_dim, head_dim)
    mean_attribute(flow, node, "num_heads", q_heads)
    bias = ins[3] if len(ins) > 3 else None
    if bias is not None:  # [q | k | v], added to the 3-D query, key and value inside the op
        if len(k) != 3 or len(bias) != 1:
            return flow.fail(node, "a MultiHeadAttention bias with key and value already split into heads")
        for part, width in zip(refine(bias[0], "cat", [q[-1].size, k[-1].size, v[-1].size]), (q[-1], k[-1], v[-1])):
            unify(part, width)
    batch = q[0]
    flow.out(node, [batch, q[1], product_of([q_heads, v_dim])])
    cache_layout(flow, node, ins, 6, batch, q_heads, head_dim)


@RULES.register("Attention", domain=MICROSOFT)
def packed_weight_attention(flow, node, ins):
    """com.microsoft Attention (what onnxruntime.transformers.optimizer writes for BERT and GPT-2): the
    projection is inside the op. input [b, s, in], weights [in, q | k | v] (qkv_hidden_sizes, or three
    equal parts), bias [q | k | v]; output [b, s, heads * v_head]; past/present [2, b, heads, s, head]."""
    x, w = ins[0], ins[1] if len(ins) > 1 else None
    num_heads = attr(node, "num_heads")
    if x is None or w is None or len(x) != 3 or len(w) != 2 or num_heads is None:
        return flow.fail(node, "a com.microsoft Attention node without a 3-D input, a 2-D weight or num_heads")
    unify(x[-1], w[0])
    flow.mark_contracted(node.inputs[1], 0)
    given = attr(node, "qkv_hidden_sizes")
    sizes = list(given) if given else ([w[1].size // 3] * 3 if w[1].size and w[1].size % 3 == 0 else None)
    if sizes is None:
        return flow.fail(node, f"a com.microsoft Attention weight of {w[1]} columns is not q | k | v")
    q, k, v = refine(w[1], "cat", sizes)
    if given:  # the widths of q, k and v: rewritten with them, like the head count
        flow.attribute_meanings[(node, "qkv_hidden_sizes")] = Meaning("sizes", [q, k, v])
    heads, head_dim = heads_of(q, num_heads)
    k_heads, k_dim = heads_of(k, num_heads)
    v_heads, v_dim = heads_of(v, num_heads)
    unify(k_heads, heads), unify(v_heads, heads), unify(k_dim, head_dim)
    bias = ins[2] if len(ins) > 2 else None
    if bias is not None:
        unify(bias[-1], w[1])
    mean_attribute(flow, node, "num_heads", heads)
    flow.out(node, [x[0], x[1], product_of([heads, v_dim])])
    if len(node.outputs) > 1 and node.outputs[1] is not None:
        past = ins[4] if len(ins) > 4 else None
        if past is not None and len(past) == 5:
            unify(past[1], x[0]), unify(past[2], heads), unify(past[4], head_dim)
        flow.out(node, [Dim(2), x[0], heads, Dim(None), head_dim], 1)


@RULES.register("RotaryEmbedding", domain=MICROSOFT)
def contrib_rotary_embedding(flow, node, ins):
    """com.microsoft RotaryEmbedding: input [b, s, heads * head] (heads from num_heads, else from the
    caches: head = 2 x cos_cache's last axis) or [b, heads, s, head]; the output keeps its shape."""
    x = ins[0]
    cos = ins[2] if len(ins) > 2 else None
    if x is None or len(x) not in (3, 4):
        return flow.fail(node, "a com.microsoft RotaryEmbedding node whose input is not 3-D or 4-D")
    if len(x) == 4:
        head_dim = x[-1]
    elif attr(node, "num_heads"):
        heads, head_dim = heads_of(x[-1], attr(node, "num_heads"))
        mean_attribute(flow, node, "num_heads", heads)
    elif cos is not None and cos[-1].size and x[-1].size and not attr(node, "rotary_embedding_dim"):
        heads, head_dim = heads_of(x[-1], x[-1].size // (2 * cos[-1].size))
    else:
        return flow.fail(node, "a com.microsoft RotaryEmbedding node whose head size cannot be told")
    flow.out(node, list(x))
    rotary_caches(flow, node, cos, head_dim, always=True)
