"""ONNX Runtime's multi-head attentions (com.microsoft): Attention and MultiHeadAttention, as
onnxruntime.transformers.optimizer writes them for BERT and GPT-2 (their dataflow rules:
shapeflow/rules/contrib_attention.py).

Attention holds the projection: input [b, s, in] @ weights [in, q | k | v] + bias, split into heads
(qkv_hidden_sizes, or three equal parts). Its past and present pack keys and values in one tensor
[2, b, heads, s, head] (keys first). MultiHeadAttention takes the projections' outputs: query
[b, s, heads * head], key and value 3-D (the op adds bias [q | k | v] and splits heads) or already split
[b, heads, s_kv, head]; past_key/past_value and present_key/present_value are [b, heads, s, head].

Both compute softmax(scale Q K^T + mask + attention_bias) V the way ONNX Runtime's CPU kernel does: a
masked-out key adds mask_filter_value (-10000 by default, not -inf, so a row with every key masked is
still a softmax of its scores), and with unidirectional a key after the query's position (offset by
the past's length) gets no weight. The key masks (mask_index, key_padding_mask) are:

    [b]        each row's end: keys at or after it are masked (right padding, what BERT's fusion writes)
    [2b]       ends, then starts: keys before the start are masked too (left padding; Attention only)
    [b, t]     1 = attend, 0 = masked, over all t = past + s keys (GPT-2's fusion writes this)
    [b, s, t]  the same per query

The 4-D Megatron mask [b, 1, max, max] is refused: ONNX Runtime's CPU kernel does not run it either.
"""

from __future__ import annotations

import math

import torch

from ..tensors import f32
from . import OPS
from .attention import split_heads

MASK_FILTER_VALUE = -10000.0


def key_mask_bias(mask: torch.Tensor, batch: int, q_len: int, kv_len: int, filter_value: float) -> torch.Tensor:
    """[b, 1, 1 or s, kv] float32 bias: 0 where a key is attended, filter_value where it is masked."""
    j = torch.arange(kv_len, device=mask.device)
    if mask.dim() == 1 and mask.shape[0] in (batch, 2 * batch):
        ends = mask[:batch].long()[:, None]
        masked = j[None] >= ends
        if mask.shape[0] == 2 * batch:
            masked |= j[None] < mask[batch:].long()[:, None].clamp(max=kv_len)
        masked = masked[:, None]  # [b, 1, kv]
    elif mask.dim() == 2:
        masked = (mask <= 0)[:, None]
    elif mask.dim() == 3:
        masked = mask <= 0
    else:
        raise NotImplementedError(f"a key mask of shape {list(mask.shape)} (the 4-D Megatron mask, or a 1-D mask "
                                  f"neither [batch] nor [2 x batch]) is not implemented in the bridge")
    bias = torch.where(masked, filter_value, 0.0).to(torch.float32)
    return bias[:, None]


def causal_bias(q_len: int, kv_len: int, past_len: int, device) -> torch.Tensor:
    """[s, kv] bias: -inf on keys after each query's own position (the past comes first)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return torch.where(j > i + past_len, -math.inf, 0.0)


def attend(a, q, k, v, mask=None, attention_bias=None, past_len: int = 0) -> torch.Tensor:
    """[b, heads, s, head] query over [b, heads, kv, head] keys and values -> [b, s, heads * v_head]."""
    b, _, s, _ = q.shape
    kv_len = k.shape[2]
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(f32(q), f32(k).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + key_mask_bias(mask, b, s, kv_len, a.get("mask_filter_value", MASK_FILTER_VALUE))
    if a.get("unidirectional", 0):
        scores = scores + causal_bias(s, kv_len, past_len, scores.device)
    if attention_bias is not None:
        scores = scores + f32(attention_bias)
    y = torch.matmul(torch.softmax(scores, -1), f32(v)).to(v.dtype)
    return y.transpose(1, 2).reshape(b, s, -1)


def refuse_extras(op: str, a, extras) -> None:
    if any(x is not None for x in extras):
        raise NotImplementedError(f"{op} with past_sequence_length or cache_indirection is not implemented in the bridge")
    if a.get("do_rotary", 0) or a.get("past_present_share_buffer", 0):
        raise NotImplementedError(f"{op} with do_rotary or past_present_share_buffer is not implemented in the bridge")


@OPS.register("Attention", domain="com.microsoft")
def packed_weight_attention(dev, a, x, weights, bias=None, mask_index=None, past=None, attention_bias=None, *extras):
    refuse_extras("com.microsoft Attention", a, extras)
    heads = a["num_heads"]
    qkv = torch.matmul(x, weights)
    if bias is not None:
        qkv = qkv + bias
    sizes = list(a.get("qkv_hidden_sizes") or [weights.shape[1] // 3] * 3)
    q, k, v = (split_heads(t, heads) for t in qkv.split(sizes, -1))
    past_len = 0
    if past is not None:
        past_len = past.shape[3]
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    y = attend(a, q, k, v, mask_index, attention_bias, past_len)
    return y if a["_nout"] == 1 else (y, torch.stack([k, v]))


def heads_with_bias(x: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """3-D [b, s, heads * head] (+ bias) -> [b, heads, s, head]; a 4-D input is already split (no bias)."""
    if x.dim() == 4:
        return x
    return split_heads(x if bias is None else x + bias, heads)


@OPS.register("MultiHeadAttention", domain="com.microsoft")
def multi_head_attention(dev, a, query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                         past_key=None, past_value=None, *extras):
    refuse_extras("MultiHeadAttention", a, extras)
    if key is None or value is None or query.dim() != 3:
        raise NotImplementedError("MultiHeadAttention with packed query/key/value is not implemented in the bridge")
    if key_padding_mask is not None and key_padding_mask.dim() == 1 and key_padding_mask.shape[0] != query.shape[0]:
        raise NotImplementedError("MultiHeadAttention with a 1-D key_padding_mask other than [batch] is not "
                                  "implemented in the bridge")  # ONNX Runtime's CPU kernel refuses it too
    heads = a["num_heads"]
    q_bias = k_bias = v_bias = None
    if bias is not None:
        width = query.shape[-1]
        q_bias, k_bias, v_bias = bias.split([width, width, bias.shape[0] - 2 * width])
    q = heads_with_bias(query, q_bias, heads)
    k, v = heads_with_bias(key, k_bias, heads), heads_with_bias(value, v_bias, heads)
    past_len = 0
    if past_key is not None and key.dim() == 3:  # an already split key/value is the whole cache (cross attention)
        past_len = past_key.shape[2]
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    y = attend(a, q, k, v, key_padding_mask, attention_bias, past_len)
    return y if a["_nout"] == 1 else (y, k, v)[:a["_nout"]]
