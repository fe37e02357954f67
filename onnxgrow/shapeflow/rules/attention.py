"""Opset-23 attention ops: Attention and RotaryEmbedding, and the node attributes that count heads.

Attention (opset 23) takes Q, K, V in one of two forms:

    4-D:  Q [b, q_heads, s, head_dim]       K [b, kv_heads, s_kv, head_dim]       V [b, kv_heads, s_kv, v_dim]
    3-D:  Q [b, s, q_heads * head_dim]      K [b, s_kv, kv_heads * head_dim]      V [b, s_kv, kv_heads * v_dim]

with the head counts of the 3-D form given by the attributes q_num_heads and kv_num_heads. The output
has Q's batch, sequence and heads and V's head size. Grouped-query attention repeats each key/value
head for a group of query heads, so q_heads = kv_heads x group, the layout structure.head_geometry
reads (kv heads the outer factor). past_key/past_value ([b, kv_heads, s_past, head_dim]) and their
present outputs add s_past + s_kv key positions; attn_mask broadcasts to [b, q_heads, s, s_total].

RotaryEmbedding rotates each head of X ([b, heads, s, head_dim], or [b, s, heads * head_dim] with
num_heads) and keeps its shape; its cos/sin caches' last axis is rotary_dim / 2 (head_dim / 2 by
default), which a Dim cannot say: resizing head_dim through it is refused.

An attribute that counts heads is a literal like a shape constant: `mean_attribute` records which
Dim it is the size of, and the Resizer rewrites it with the new size.
"""

from __future__ import annotations

from ...dims import Dim, DimConflict, product_of, same, unify
from ..core import RULES, Meaning, attr


ROTARY_HALF = "the rotary caches measure half of head_dim"  # a soft problem: blocks resizing head_dim only


def mean_attribute(flow, node, name: str, dim: Dim):
    """Record that the int attribute `name` of `node` is the size of `dim` (where the node has it)."""
    value = attr(node, name)
    if value is None:
        return
    if dim.size is not None and dim.size != value:
        raise DimConflict(f"attribute {name}={value} does not match {dim}")
    flow.attribute_meanings[(node, name)] = Meaning("size", [dim])


def heads_of(width: Dim, heads: int) -> tuple[Dim, Dim]:
    """(heads, per-head) Dims of an axis laid out as heads x per-head (the 3-D form)."""
    if width.size is None or width.size % heads:
        raise DimConflict(f"{width} is not a multiple of {heads} heads")
    h, per = Dim(heads), Dim(width.size // heads)
    unify(width, product_of([h, per]))
    return h, per


def group_heads(q_heads: Dim, kv_heads: Dim) -> None:
    """q_heads = kv_heads x group: one Dim when equal, else the query head axis is refined."""
    if same(q_heads, kv_heads) or q_heads.size == kv_heads.size:
        return unify(q_heads, kv_heads)
    if q_heads.size is None or kv_heads.size is None or q_heads.size % kv_heads.size:
        raise DimConflict(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    unify(q_heads, product_of([kv_heads, Dim(q_heads.size // kv_heads.size)]))


def attention_form(q: list[Dim]) -> str | None:
    """"4-D" or "3-D" by Q's rank, else None."""
    return {4: "4-D", 3: "3-D"}.get(len(q))


@RULES.register("Attention", since=23)
def attention(flow, node, ins):
    q, k, v = ins[0], ins[1], ins[2]
    if q is None or k is None or v is None:
        return flow.fail(node, "an opset-23 Attention node whose Q, K or V shape is unknown")
    form = attention_form(q)
    if form is None or len(k) != len(q) or len(v) != len(q):
        return flow.fail(node, f"an opset-23 Attention node with {len(q)}-D Q, {len(k)}-D K and {len(v)}-D V")
    for a, b in ((q[0], k[0]), (k[0], v[0])):  # batch
        unify(a, b)
    if form == "4-D":
        q_heads, kv_heads, head_dim, v_dim = q[1], k[1], q[-1], v[-1]
        unify(k[1], v[1]), unify(k[2], v[2]), unify(q[-1], k[-1])
        seq, kv_seq = q[2], k[2]
    else:
        for name in ("q_num_heads", "kv_num_heads"):
            if attr(node, name) is None:
                return flow.fail(node, f"an opset-23 Attention node with 3-D inputs and no {name} attribute")
        unify(k[1], v[1])
        q_heads, head_dim = heads_of(q[-1], attr(node, "q_num_heads"))
        kv_heads, k_dim = heads_of(k[-1], attr(node, "kv_num_heads"))
        unify(k_dim, head_dim)
        v_heads, v_dim = heads_of(v[-1], attr(node, "kv_num_heads"))
        unify(v_heads, kv_heads)
        seq, kv_seq = q[1], k[1]
    group_heads(q_heads, kv_heads)
    mean_attribute(flow, node, "q_num_heads", q_heads)
    mean_attribute(flow, node, "kv_num_heads", kv_heads)
    batch = q[0]
    flow.out(node, [batch, q_heads, seq, v_dim] if form == "4-D" else [batch, seq, product_of([q_heads, v_dim])])
    total = past_and_present(flow, node, ins, batch, kv_heads, kv_seq, head_dim, v_dim)
    if len(node.outputs) > 3 and node.outputs[3] is not None:
        flow.out(node, [batch, q_heads, seq, total], 3)
    mask = ins[3] if len(ins) > 3 else None
    if mask is not None:
        unify_mask(flow, node, mask, [batch, q_heads, seq, total])


def past_and_present(flow, node, ins, batch, kv_heads, kv_seq, head_dim, v_dim) -> Dim:
    """The key positions attended to: the past's and the new ones (a new Dim when there is a past)."""
    past_k = ins[4] if len(ins) > 4 else None
    past_v = ins[5] if len(ins) > 5 else None
    total = kv_seq
    if past_k is not None and past_v is not None:
        for p, last in ((past_k, head_dim), (past_v, v_dim)):
            unify(p[0], batch), unify(p[1], kv_heads), unify(p[-1], last)
        unify(past_k[2], past_v[2])
        total = Dim(None)  # past + new positions
    for i, last in ((1, head_dim), (2, v_dim)):
        if len(node.outputs) > i and node.outputs[i] is not None:
            flow.out(node, [batch, kv_heads, total, last], i)
    return total


def unify_mask(flow, node, mask, full):
    """The mask broadcasts to [b, q_heads, s, s_total]: its axes of size other than 1 are those."""
    try:
        for m, d in zip(reversed(mask), reversed(full)):
            if m.size != 1:
                unify(m, d)
    except DimConflict as e:  # a mask that does not fit blocks only resizing what it measures
        flow.problems_if_resized(node, mask[-1], f"the attention mask does not match the scores: {e}")


@RULES.register("RotaryEmbedding", since=23)
def rotary_embedding(flow, node, ins):
    x, cos = ins[0], ins[1]
    if x is None:
        return flow.fail(node, "an opset-23 RotaryEmbedding node whose input shape is unknown")
    if len(x) == 4:
        heads, head_dim = x[1], x[-1]
    elif len(x) == 3:
        if attr(node, "num_heads") is None:
            return flow.fail(node, "an opset-23 RotaryEmbedding node with 3-D input and no num_heads attribute")
        heads, head_dim = heads_of(x[-1], attr(node, "num_heads"))
    else:
        return flow.fail(node, f"an opset-23 RotaryEmbedding node with {len(x)}-D input")
    mean_attribute(flow, node, "num_heads", heads)
    flow.out(node, list(x))
    # the caches measure head_dim / 2 (or rotary_dim / 2): no Dim says "half of"
    flow.problems_if_resized(node, head_dim, ROTARY_HALF)
    if cos is not None:
        flow.problems_if_resized(node, cos[-1], ROTARY_HALF)
