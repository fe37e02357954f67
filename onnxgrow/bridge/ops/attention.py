"""Opset-23 attention ops: Attention and RotaryEmbedding (their dataflow rules: shapeflow/rules/attention.py).

Attention computes, per head, softmax(softcap(Q K^T * scale) + bias) V, where the bias holds the
mask (boolean: where to attend; float: added) and, with is_causal, -inf above the diagonal offset by
the past's length. Grouped-query attention repeats each key/value head for its group of query heads
(kv head j serves query heads j*g ... j*g + g-1). The 3-D form splits heads with q_num_heads and
kv_num_heads first and joins them after. Scores and softmax run in float32 (as Softmax does here).

RotaryEmbedding rotates the first rotary_dim entries of each head by the cos/sin caches (indexed by
position_ids when given): halves (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), or even/odd
entries when interleaved.
"""

from __future__ import annotations

import math

import torch

from ..tensors import f32
from . import OPS


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, s, heads * d] -> [b, heads, s, d]."""
    b, s, width = x.shape
    return x.reshape(b, s, heads, width // heads).transpose(1, 2)


def attention_bias(a, mask, q_len: int, kv_len: int, past_len: int, dtype, device) -> torch.Tensor:
    """The additive bias of the scores: the mask (padded with 'no' up to kv_len) and the causal part."""
    bias = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    if mask is not None:
        pad = kv_len - mask.shape[-1]
        if mask.dtype == torch.bool:
            mask = torch.nn.functional.pad(mask, (0, pad), value=False) if pad > 0 else mask
            mask = torch.where(mask, 0.0, -math.inf).to(dtype)
        else:
            mask = torch.nn.functional.pad(mask.to(dtype), (0, pad), value=-math.inf) if pad > 0 else mask.to(dtype)
        bias = bias + mask
    if a.get("is_causal", 0):
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(kv_len, device=device)[None, :]
        bias = bias + torch.where(j <= i + past_len, 0.0, -math.inf).to(dtype)
    return bias


def attend(q, k, v, a, bias_for) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ · scale, softcapped, + bias) v in float32, the scores): k and v [b, kv_heads, t, d]
    are repeated for grouped-query heads; `bias_for(scores)` gives the additive mask; a query row whose
    keys are all masked gives zeros (as ONNX Runtime's kernels do)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = a.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(f32(q), f32(k).transpose(-1, -2)) * scale
    softcap = a.get("softcap", 0.0)
    if softcap and softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    bias = bias_for(scores)
    probs = torch.softmax(scores + bias, -1)
    probs = torch.where(torch.isneginf(bias.amax(-1, keepdim=True)), 0.0, probs)
    return torch.matmul(probs, f32(v)), scores


@OPS.register("Attention", since=23)
def attention(dev, a, q, k, v, mask=None, past_key=None, past_value=None, *rest):
    if rest and any(r is not None for r in rest):
        raise NotImplementedError("Attention with nonpad_kv_seqlen is not implemented in the bridge")
    three_d = q.dim() == 3
    if three_d:
        q, k, v = split_heads(q, a["q_num_heads"]), split_heads(k, a["kv_num_heads"]), split_heads(v, a["kv_num_heads"])
    dtype = q.dtype
    past_len = past_key.shape[2] if past_key is not None else 0
    if past_key is not None:
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    present_k, present_v = k, v
    y, scores = attend(q, k, v, a, lambda s: attention_bias(a, mask, q.shape[2], k.shape[2], past_len, s.dtype,
                                                            s.device))
    y = y.to(dtype)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y if a["_nout"] == 1 else (y, present_k, present_v, scores)[:a["_nout"]]


@OPS.register("RotaryEmbedding", since=23)
def rotary_embedding(dev, a, x, cos, sin, position_ids=None):
    shape = x.shape
    if x.dim() == 3:  # [b, s, heads * d] -> [b, heads, s, d]
        x = split_heads(x, a["num_heads"])
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [b, 1, s, rot / 2]: one per head
    rot = a.get("rotary_embedding_dim", 0) or x.shape[-1]
    rotate, keep = x[..., :rot], x[..., rot:]
    if a.get("interleaved", 0):
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate.chunk(2, -1)
    real, imag = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    if a.get("interleaved", 0):
        rotated = torch.stack([real, imag], -1).flatten(-2)
    else:
        rotated = torch.cat([real, imag], -1)
    y = torch.cat([rotated, keep], -1)
    if len(shape) == 3:
        y = y.transpose(1, 2).reshape(shape)
    return y


# --- ONNX Runtime's GroupQueryAttention (com.microsoft), as the onnxruntime-genai builder writes it ---------

def gqa_positions(seqlens_k: torch.Tensor, q_len: int, past_len: int) -> torch.Tensor:
    """[b, s] positions of the new tokens: 0.. for a first prompt, else after each row's cached tokens
    (seqlens_k holds each row's total length - 1)."""
    steps = torch.arange(q_len, device=seqlens_k.device)
    if past_len == 0:
        return steps[None].expand(seqlens_k.shape[0], -1)
    return (seqlens_k.long() + 1 - q_len)[:, None] + steps[None]


def gqa_bias(seqlens_k: torch.Tensor, q_len: int, kv_len: int, past_len: int, window: int, dtype) -> torch.Tensor:
    """[b, 1, s, kv] additive bias: causal after each row's past, and no key beyond its total length."""
    total = seqlens_k.long()[:, None, None] + 1  # [b, 1, 1]
    start = total - q_len if past_len else torch.zeros_like(total)  # the first new token's position
    i = torch.arange(q_len, device=seqlens_k.device)[None, :, None]
    j = torch.arange(kv_len, device=seqlens_k.device)[None, None, :]
    allowed = (j <= start + i) & (j < total)
    if window is not None and window > 0:
        allowed &= j > start + i - window
    return torch.where(allowed, 0.0, -math.inf).to(dtype)[:, None]


@OPS.register("GroupQueryAttention", domain="com.microsoft")
def group_query_attention(dev, a, query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                          total_sequence_length=None, cos_cache=None, sin_cache=None, *rest):
    if rest and any(r is not None for r in rest):
        raise NotImplementedError("GroupQueryAttention with position_ids, attention_bias or head_sink is not "
                                  "implemented in the bridge")
    heads, kv_heads = a["num_heads"], a["kv_num_heads"]
    if key is None:  # packed q | k | v
        head_dim = query.shape[-1] // (heads + 2 * kv_heads)
        query, key, value = query.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q, k, v = split_heads(query, heads), split_heads(key, kv_heads), split_heads(value, kv_heads)
    past_len = past_key.shape[2] if past_key is not None else 0
    if a.get("do_rotary", 0):
        pos = gqa_positions(seqlens_k, q.shape[2], past_len)
        cos, sin = cos_cache[pos][:, None], sin_cache[pos][:, None]  # [b, 1, s, rot / 2]
        q, k = rotate(q, cos, sin, a.get("rotary_interleaved", 0)), rotate(k, cos, sin, a.get("rotary_interleaved", 0))
    if past_key is not None and past_len:
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    present_k, present_v = k, v
    y, _ = attend(q, k, v, a, lambda s: gqa_bias(seqlens_k, q.shape[2], k.shape[2], past_len,
                                                  a.get("local_window_size", -1), s.dtype))
    y = y.to(query.dtype)
    y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return y if a["_nout"] == 1 else (y, present_k, present_v)[:a["_nout"]]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: int) -> torch.Tensor:
    """Rotary embedding of the first 2 x cos.shape[-1] entries of each head (as RotaryEmbedding does)."""
    rot = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    part, keep = x[..., :rot], x[..., rot:]
    x1, x2 = (part[..., 0::2], part[..., 1::2]) if interleaved else part.chunk(2, -1)
    real, imag = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    rotated = torch.stack([real, imag], -1).flatten(-2) if interleaved else torch.cat([real, imag], -1)
    return torch.cat([rotated, keep], -1)


@OPS.register("RotaryEmbedding", domain="com.microsoft")
def contrib_rotary_embedding(dev, a, x, position_ids, cos_cache, sin_cache):
    """com.microsoft RotaryEmbedding: [b, s, heads * head] or [b, heads, s, head]; position_ids [b, s], or
    one start position for every row."""
    shape = x.shape
    if x.dim() == 3:
        head = 2 * cos_cache.shape[-1] if not a.get("num_heads") else shape[-1] // a["num_heads"]
        x = split_heads(x, shape[-1] // head)
    s = x.shape[2]
    pos = position_ids.long()
    if pos.numel() == 1:
        pos = (pos.reshape(1, 1) + torch.arange(s, device=pos.device)[None]).expand(x.shape[0], -1)
    rot = a.get("rotary_embedding_dim", 0) or x.shape[-1]
    cos, sin = cos_cache[pos][..., :rot // 2][:, None], sin_cache[pos][..., :rot // 2][:, None]
    y = rotate(x, cos, sin, a.get("interleaved", 0))
    if len(shape) == 3:
        y = y.transpose(1, 2).reshape(shape)
    return y
